"""Inner-product manipulation (Xie, Koyejo and Gupta, UAI 2020)."""

from __future__ import annotations


from torch import Tensor

from attacks.base import ATTACKS, Attack, Knowledge, ServerView, knowledge_problems


@ATTACKS.register("ipm")
class IPM(Attack):
    """Every attacking client sends ``-epsilon * mean(benign updates)``, so that the inner
    product of the aggregate with the true mean turns negative (epsilon = 0.1 slips under
    distance-based rules; epsilon = 100 overwhelms the mean).

    Knowledge: ``"omniscient"`` (default, the paper's model): the benign updates are the
    other clients' rows of this round, seen on the server side after the gather;
    ``"own"``: the attackers estimate the mean from their own honest updates (every
    attacker trains honestly first). Untargeted: ASR is not measured.

    Args:
        epsilon: the factor (paper: 0.1 and 100).
        knowledge: "omniscient" or "own".
        **kwargs: the base Attack's arguments (malicious_fraction, selection, schedule).
    """

    def __init__(self, epsilon: float = 0.1, knowledge: Knowledge = "omniscient",
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.epsilon = epsilon
        self.knowledge = knowledge

    def problems(self) -> list[tuple[str, object, str]]:
        found = super().problems()
        if not self.epsilon > 0:
            found.append(("attack.epsilon", self.epsilon, "a number > 0"))
        found.extend(knowledge_problems(self.knowledge))
        return found

    def craft_round(self, view: ServerView) -> Tensor | None:
        reference = view.reference(self.knowledge)
        if len(reference) == 0:
            return None  # every selected client attacks: no benign update to invert
        row = -self.epsilon * reference.mean(dim=0)
        return row.expand(int(view.own.sum()), -1).clone()
