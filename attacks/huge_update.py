"""A faulty or blunt client: its update is scaled to an absurd norm."""

from __future__ import annotations

from torch import Tensor

from attacks.base import ATTACKS, Attack, ClientInfo


@ATTACKS.register("huge_update")
class HugeUpdate(Attack):
    """Attacking clients train honestly, then send their update times ``factor``
    (default 1e8: far past any sane norm, still finite in fp32).

    Args:
        malicious_fraction: share of all clients that send huge updates.
        factor: multiplier of the honest update.
        **kwargs: the base Attack's arguments (selection, schedule, scale: multiplies on top).
    """

    def __init__(self, malicious_fraction: float = 0.1, factor: float = 1e8, **kwargs) -> None:
        super().__init__(malicious_fraction=malicious_fraction, **kwargs)
        self.factor = factor

    def craft_update(self, update: Tensor, client: ClientInfo) -> Tensor:
        return super().craft_update(update, client) * self.factor
