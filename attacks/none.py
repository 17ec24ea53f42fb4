"""No attack: every client is benign. A first-class grid value for the clean baseline."""

from __future__ import annotations

from attacks.base import ATTACKS, Attack


@ATTACKS.register("none")
class NoAttack(Attack):
    """No malicious clients; ASR is not measured."""

    def __init__(self) -> None:
        super().__init__(malicious_fraction=0.0)
