"""A Little Is Enough (Baruch, Baruch and Goldberg, NeurIPS 2019)."""

from __future__ import annotations

import math
from statistics import NormalDist

from torch import Tensor

from attacks.base import ATTACKS, Attack, Knowledge, ServerView, knowledge_problems


def z_max(n: int, f: int) -> float:
    """The paper's z: ``s = floor(n / 2 + 1) - f`` supporters are needed, and z is the
    standard normal quantile of ``(n - s) / n``: the largest shift for which s benign
    clients are still farther from the mean than the attackers (expected)."""
    s = math.floor(n / 2 + 1) - f
    return NormalDist().inv_cdf((n - s) / n)


@ATTACKS.register("alie")
class ALIE(Attack):
    """Every attacking client sends, per coordinate, ``mean - z * std`` of the benign
    updates (std with Bessel's correction, as torch.std), the same row for all attackers.
    z defaults to :func:`z_max` with n = the clients of the round and f = its attackers
    (n = 10, f = 3: s = 3, z = Phi^-1(0.7) = 0.524).

    Knowledge: ``"omniscient"`` (default): mean and std over the other clients' rows of
    this round (server side, after the gather); ``"own"`` (the paper's setting): over the
    attackers' own honest updates (at least 2 attackers needed for a std; with one, its
    update is sent unchanged). Untargeted: ASR is not measured.

    Args:
        z: the shift in standard deviations; None = z_max(n, f).
        knowledge: "omniscient" or "own".
        **kwargs: the base Attack's arguments (malicious_fraction, selection, schedule).
    """

    def __init__(self, z: float | None = None, knowledge: Knowledge = "omniscient",
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.z = z
        self.knowledge = knowledge

    def problems(self) -> list[tuple[str, object, str]]:
        found = super().problems()
        if self.z is not None and not math.isfinite(self.z):
            found.append(("attack.z", self.z, "None (z_max from n and f) or a finite number"))
        found.extend(knowledge_problems(self.knowledge))
        return found

    def craft_round(self, view: ServerView) -> Tensor | None:
        reference = view.reference(self.knowledge)
        if len(reference) < 2:
            return None  # no spread to hide in
        attackers = int(view.own.sum())
        z = self.z if self.z is not None else z_max(len(view.updates), attackers)
        row = reference.mean(dim=0) - z * reference.std(dim=0)
        return row.expand(attackers, -1).clone()
