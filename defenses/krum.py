"""Krum (Blanchard et al., NeurIPS 2017)."""

from __future__ import annotations

import torch
from torch import Tensor

from defenses.base import DEFENSES, Aggregate, Defense, DefenseSetup, RoundContext


def pairwise_sq_distances(updates: Tensor) -> Tensor:
    """``D[i, j] = ||g_i - g_j||^2`` through one Gram matrix product, clamped at 0."""
    gram = updates @ updates.T
    sq = gram.diagonal()
    return (sq.unsqueeze(0) + sq.unsqueeze(1) - 2 * gram).clamp_min_(0)


def round_f(configured: int | None, env: DefenseSetup | None) -> int:
    if configured is not None:
        return configured
    return env.expected_malicious if env is not None else 0


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
        return torch.zeros(n, device=updates.device, dtype=updates.dtype), f_used, 0
    nearest = torch.topk(distances, neighbours, dim=1, largest=False).values
    return nearest.sum(dim=1), f_used, neighbours


def check_f(f: int | None, env: DefenseSetup) -> list[tuple[str, object, str]]:
    f_value = round_f(f, env)
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
    nearest to ``g_i`` (squared Euclidean distance, ``j != i``). Ties go to the lowest
    row. Requires ``n > 2f + 2``. Every other client is excluded.

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
        scores, f_used, neighbours = krum_scores(updates, round_f(self.f, self.env))
        chosen = int(torch.argmin(scores))
        weights = torch.zeros(len(updates), device=updates.device, dtype=updates.dtype)
        weights[chosen] = 1.0
        info = {"scores": scores.tolist(), "f": f_used, "neighbours": neighbours}
        return Aggregate(updates[chosen].clone(), weights, weights == 0, info)
