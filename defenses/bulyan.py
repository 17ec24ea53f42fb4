"""Bulyan (El Mhamdi, Guerraoui and Rouault, ICML 2018)."""

from __future__ import annotations

import torch
from torch import Tensor

from defenses.base import DEFENSES, Aggregate, Defense, DefenseSetup, RoundContext, assumed_malicious
from defenses.krum import pairwise_sq_distances


@DEFENSES.register("bulyan")
class Bulyan(Defense):
    """Two stages. Selection: ``theta = n - 2f`` updates chosen by Krum applied
    repeatedly, each time to the updates not chosen yet (scores recomputed on that set
    with the same f: the sum of squared distances to its ``m - f - 2`` nearest, m the set's
    size, distances in float64; ties to the lowest row). Aggregation: per coordinate, the mean of the
    ``beta = theta - 2f`` selected values closest to the selected values' median (for
    even theta the median is the mean of the two middle values; ties to the lower rows).
    Requires ``n >= 4f + 3``.

    The clients not selected are excluded; a selected client's verdict weight is the
    number of coordinates on which its value entered the mean, normalised.

    Args:
        f: assumed Byzantine clients per round; None = the expected number of attackers.
    """

    def __init__(self, f: int | None = None) -> None:
        super().__init__()
        self.f = f

    def problems(self, env: DefenseSetup) -> list[tuple[str, object, str]]:
        f, n = assumed_malicious(self.f, env), env.clients_per_round
        if f >= 0 and n >= 4 * f + 3:
            return []
        shown = self.f if self.f is not None else f"None (expected attackers = {f})"
        allowed = f"f <= {(n - 3) // 4}" if n >= 3 else "no f works: select at least 3 clients per round"
        return [("defense.f", shown, f"Bulyan needs n >= 4f + 3; with n = {n} clients per round, {allowed}")]

    @staticmethod
    def select(updates: Tensor, f: int) -> list[int]:
        """Repeated Krum with the same f on the shrinking set (distances computed once, in
        float64 as Krum's); with ``m - f - 2 <= 0`` neighbours every score is 0 and the
        lowest remaining row is taken."""
        distances = pairwise_sq_distances(updates)
        distances.fill_diagonal_(float("inf"))
        remaining = list(range(len(updates)))
        chosen = []
        for _ in range(len(updates) - 2 * f):
            neighbours = max(len(remaining) - f - 2, 0)
            among = distances[remaining][:, remaining]
            scores = torch.topk(among, neighbours, dim=1, largest=False).values.sum(dim=1) if neighbours \
                else torch.zeros(len(remaining), dtype=torch.float64, device=updates.device)
            chosen.append(remaining.pop(int(torch.sort(scores, stable=True).indices[0])))
        return chosen

    def aggregate(self, updates: Tensor, num_samples: Tensor, ctx: RoundContext) -> Aggregate:
        n = len(updates)
        f = min(assumed_malicious(self.f, self.env), max((n - 3) // 4, 0))  # screening may leave fewer
        chosen = self.select(updates, f)
        selected = updates[chosen]
        beta = len(chosen) - 2 * f
        median = selected.median(dim=0).values if len(chosen) % 2 else selected.sort(dim=0).values[
            len(chosen) // 2 - 1 : len(chosen) // 2 + 1].mean(dim=0)
        closest = torch.sort((selected - median).abs(), dim=0, stable=True).indices[:beta]
        update = torch.gather(selected, 0, closest).mean(dim=0)
        counts = torch.zeros(n, device=updates.device, dtype=updates.dtype)
        counts[chosen] = torch.bincount(closest.reshape(-1), minlength=len(chosen)).to(updates.dtype)
        excluded = torch.ones(n, dtype=torch.bool, device=updates.device)
        excluded[chosen] = False
        info = {"selected": chosen, "f": f, "beta": beta}
        return Aggregate(update, counts / counts.sum(), excluded, info)
