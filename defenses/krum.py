"""Krum (Blanchard et al., NeurIPS 2017)."""

from __future__ import annotations

import torch
from torch import Tensor

from defenses.base import DEFENSES, Aggregate, Defense, DefenseSetup, RoundContext, assumed_malicious
from fedbench.order_statistics import trimmed_mean


def pairwise_sq_distances(updates: Tensor, chunk: int = 1 << 20) -> Tensor:
    """``D[i, j] = ||g_i - g_j||^2`` in float64, accurate when the updates share a large
    common component.

    Through a Gram matrix, ``||a||^2 + ||b||^2 - 2 a.b``, a shared offset cancels: in
    float32 an offset 1000x the updates' spread leaves the distances with about 1e-3
    relative error. So the updates are first centred on their coordinate-wise median
    (distances do not change under a shift; one huge update cannot move the median, as it
    would move the mean; the median is a float32 value like the updates, so their
    difference is exact in float64 for any realistic range of magnitudes), and the Gram
    matrix is accumulated in float64, ``chunk`` coordinates at a time so memory stays at
    ``n * chunk`` doubles. Updates on a small integer grid give exact distances and ties.
    """
    n, dim = updates.shape
    centre = trimmed_mean(updates, (n - 1) // 2)[0] if n > 2 else updates[0]
    gram = torch.zeros((n, n), dtype=torch.float64, device=updates.device)
    for start in range(0, dim, chunk):
        block = updates[:, start : start + chunk].to(torch.float64) - centre[start : start + chunk].to(torch.float64)
        gram += block @ block.T
    sq = gram.diagonal()
    return (sq.unsqueeze(0) + sq.unsqueeze(1) - 2 * gram).clamp_min_(0)


def krum_scores(updates: Tensor, f: int) -> tuple[Tensor, int, int]:
    """Krum scores, the f actually used and the neighbour count.

    ``score_i = sum of the n - f - 2 smallest ||g_i - g_j||^2 over j != i``.
    Should screening leave too few updates for ``n > 2f + 2`` in a round, f is lowered
    to ``max((n - 3) // 2, 0)`` for that round (and reported).
    """
    n = len(updates)
    f_used = f if n > 2 * f + 2 else max((n - 3) // 2, 0)
    neighbours = max(n - f_used - 2, 0)
    distances = pairwise_sq_distances(updates)
    distances.fill_diagonal_(float("inf"))
    if neighbours == 0:
        return torch.zeros(n, device=updates.device, dtype=torch.float64), f_used, 0
    nearest = torch.topk(distances, neighbours, dim=1, largest=False).values
    return nearest.sum(dim=1), f_used, neighbours


def check_f(f: int | None, env: DefenseSetup) -> list[tuple[str, object, str]]:
    f_value = assumed_malicious(f, env)
    n = env.clients_per_round
    if f_value < 0:
        return [("defense.f", f, "an integer >= 0, or None for the expected number of attackers")]
    if n <= 2 * f_value + 2:
        allowed = f"f <= {(n - 3) // 2}" if n >= 3 else "no f works: select at least 3 clients per round"
        return [(
            "defense.f",
            f if f is not None else f"None (expected attackers = {f_value})",
            f"Krum needs n > 2f + 2; with n = {n} clients per round, {allowed}",
        )]
    return []


@DEFENSES.register("krum")
class Krum(Defense):
    """Picks the one update with the lowest Krum score:
    ``score_i = sum_{j in N_i} ||g_i - g_j||_2^2``, ``N_i`` = the ``n - f - 2`` updates
    nearest to ``g_i`` (squared Euclidean distance, ``j != i``, computed in float64 on
    centred updates: see :func:`pairwise_sq_distances`). Ties go to the lowest row.
    Requires ``n > 2f + 2``. Every other client is excluded. The default f is the true
    expected number of attackers: the oracle knowledge the papers give every defense.

    Args:
        f: assumed number of Byzantine clients per round; None = the expected number of
            attackers among the selected clients.
    """

    def __init__(self, f: int | None = None) -> None:
        super().__init__()
        self.f = f

    def problems(self, env: DefenseSetup) -> list[tuple[str, object, str]]:
        return check_f(self.f, env)

    def aggregate(self, updates: Tensor, num_samples: Tensor, ctx: RoundContext) -> Aggregate:
        scores, f_used, neighbours = krum_scores(updates, assumed_malicious(self.f, self.env))
        chosen = int(torch.argmin(scores))
        weights = torch.zeros(len(updates), device=updates.device, dtype=updates.dtype)
        weights[chosen] = 1.0
        info = {"scores": scores.tolist(), "f": f_used, "neighbours": neighbours}
        return Aggregate(updates[chosen].clone(), weights, weights == 0, info)
