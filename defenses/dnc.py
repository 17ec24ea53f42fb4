"""Divide-and-Conquer (Shejwalkar and Houmansadr, NDSS 2021, "Manipulating the Byzantine")."""

from __future__ import annotations

import torch
from torch import Tensor

from defenses.base import DEFENSES, Aggregate, Defense, DefenseSetup, RoundContext, assumed_malicious


@DEFENSES.register("dnc")
class DnC(Defense):
    """``niters`` times: draw ``b`` coordinates at random (without replacement, from the
    round's defense stream; all of them when d <= b), centre the sub-updates on their mean,
    take the top right singular vector v of the centred ``[n, b]`` matrix and score
    ``s_i = <g_i - mean, v>^2``; the ``n - c*f`` lowest scores form this iteration's good
    set. The final good set is the intersection over iterations; the aggregate is the
    unweighted mean of its updates, everyone else excluded (floor(c*f) removed each time).

    Args:
        f: assumed attackers per round; None = the expected number (as every baseline).
        niters: iterations (default 5).
        subsample: b, coordinates per iteration (default 10,000).
        filter_fraction: c, removing c * f per iteration (default 1).
    """

    def __init__(self, f: int | None = None, niters: int = 5, subsample: int = 10_000,
                 filter_fraction: float = 1.0) -> None:
        super().__init__()
        self.f = f
        self.niters = niters
        self.subsample = subsample
        self.filter_fraction = filter_fraction

    def problems(self, env: DefenseSetup) -> list[tuple[str, object, str]]:
        found = []
        removed = int(self.filter_fraction * assumed_malicious(self.f, env))
        if self.f is not None and self.f < 0:
            found.append(("defense.f", self.f, "None or an integer >= 0"))
        elif not 0 <= removed < env.clients_per_round:
            found.append(("defense.filter_fraction", self.filter_fraction,
                          f"c with 0 <= c * f < n = {env.clients_per_round} clients per round"))
        if self.niters < 1:
            found.append(("defense.niters", self.niters, "an integer >= 1"))
        if self.subsample < 1:
            found.append(("defense.subsample", self.subsample, "an integer >= 1"))
        return found

    def scores(self, updates: Tensor, coordinates: Tensor) -> Tensor:
        sub = updates[:, coordinates].double()
        centred = sub - sub.mean(dim=0)
        top = torch.linalg.svd(centred, full_matrices=False).Vh[0]
        return (centred @ top) ** 2

    def aggregate(self, updates: Tensor, num_samples: Tensor, ctx: RoundContext) -> Aggregate:
        n, d = updates.shape
        removed = min(int(self.filter_fraction * assumed_malicious(self.f, self.env)), n - 1)
        good = torch.ones(n, dtype=torch.bool, device=updates.device)
        for _ in range(self.niters):
            coordinates = torch.randperm(d, generator=ctx.generator, device=ctx.generator.device)[: self.subsample] \
                if d > self.subsample else torch.arange(d)
            order = torch.sort(self.scores(updates, coordinates.to(updates.device)), stable=True).indices
            kept = torch.zeros(n, dtype=torch.bool, device=updates.device)
            kept[order[: n - removed]] = True
            good &= kept
        if not good.any():  # the intersection emptied: nobody is trusted this round
            return Aggregate(torch.zeros_like(updates[0]), torch.zeros(n, dtype=updates.dtype, device=updates.device),
                             ~good, {"removed_per_iteration": removed})
        weights = good.to(updates.dtype) / good.sum()
        return Aggregate(weights @ updates, weights, ~good, {"removed_per_iteration": removed})
