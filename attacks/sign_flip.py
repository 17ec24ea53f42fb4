"""Sign flipping: the attacker sends its honest update reversed and scaled."""

from __future__ import annotations

from torch import Tensor

from attacks.base import ATTACKS, Attack, ClientInfo


@ATTACKS.register("sign_flip")
class SignFlip(Attack):
    """An attacking client trains honestly on clean data, then sends ``-s * u`` where u is
    its honest update (Allen-Zhu et al. 2020; Karimireddy et al., ICML 2021 use s = 1).
    Untargeted: ASR is not measured. The attacker knows only its own update.

    Args:
        strength: s > 0; 1 reverses the update.
        **kwargs: the base Attack's arguments (malicious_fraction, selection, schedule, scale:
            multiplies on top).
    """

    def __init__(self, strength: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.strength = strength

    def problems(self) -> list[tuple[str, object, str]]:
        found = super().problems()
        if not self.strength > 0:
            found.append(("attack.strength", self.strength, "a number > 0"))
        return found

    def craft_update(self, update: Tensor, client: ClientInfo) -> Tensor:
        return -self.strength * super().craft_update(update, client)
