"""A faulty client: its update is NaN. For testing that the engine screens updates."""

from __future__ import annotations

from torch import Tensor

from attacks.base import ATTACKS, Attack, ClientInfo


@ATTACKS.register("nan_update")
class NaNUpdate(Attack):
    """Attacking clients train honestly, then send an update full of NaN.

    Args:
        malicious_fraction: share of all clients that send NaN.
        **kwargs: the base Attack's arguments (selection, schedule).
    """

    def __init__(self, malicious_fraction: float = 0.1, **kwargs) -> None:
        super().__init__(malicious_fraction=malicious_fraction, **kwargs)

    def craft_update(self, update: Tensor, client: ClientInfo) -> Tensor:
        return update.clone().fill_(float("nan"))
