"""Multi-Krum (Blanchard et al., NeurIPS 2017)."""

from __future__ import annotations

import torch
from torch import Tensor

from defenses.base import DEFENSES, Aggregate, Defense, DefenseSetup, RoundContext, assumed_malicious
from defenses.krum import check_f, krum_scores


@DEFENSES.register("multi_krum")
class MultiKrum(Defense):
    """Unweighted mean of the ``m`` updates with the lowest Krum scores (scores computed
    once: ``score_i`` = sum of squared Euclidean distances to the ``n - f - 2`` nearest
    other updates). ``m = n - f`` by default. Ties go to the lowest rows. The other
    ``n - m`` clients are excluded.

    Args:
        f: assumed number of Byzantine clients per round; None = expected attackers.
        m: how many updates to average; None = n - f.
    """

    def __init__(self, f: int | None = None, m: int | None = None) -> None:
        super().__init__()
        self.f = f
        self.m = m

    def problems(self, env: DefenseSetup) -> list[tuple[str, object, str]]:
        found = check_f(self.f, env)
        if self.m is not None and not 1 <= self.m <= env.clients_per_round:
            found.append(("defense.m", self.m, f"None or an integer in [1, {env.clients_per_round}]"))
        return found

    def aggregate(self, updates: Tensor, num_samples: Tensor, ctx: RoundContext) -> Aggregate:
        n = len(updates)
        scores, f_used, neighbours = krum_scores(updates, assumed_malicious(self.f, self.env))
        m = min(self.m if self.m is not None else n - f_used, n)
        order = torch.sort(scores, stable=True).indices
        chosen = order[:m]
        weights = torch.zeros(n, device=updates.device, dtype=updates.dtype)
        weights[chosen] = 1.0 / m
        info = {"scores": scores.tolist(), "f": f_used, "m": m, "neighbours": neighbours}
        return Aggregate(weights @ updates, weights, weights == 0, info)
