"""Robust federated aggregation: the geometric median (Pillutla, Kakade and Harchaoui,
IEEE Transactions on Signal Processing 2022)."""

from __future__ import annotations

import torch
from torch import Tensor

from defenses.base import DEFENSES, Aggregate, Defense, DefenseSetup, RoundContext, none_excluded, sample_weights


@DEFENSES.register("rfa")
class RFA(Defense):
    """The weighted geometric median ``argmin_v sum_k alpha_k ||v - u_k||`` (alpha_k = the
    sample-count weights) by the smoothed Weiszfeld algorithm of the paper: start at the
    weighted mean, then ``iterations`` times

        beta_k = alpha_k / max(nu, ||v - u_k||),   v = sum_k beta_k u_k / sum_k beta_k.

    Distances in float64. No client is excluded; a client's verdict weight is its
    normalised beta_k of the last iteration.

    Args:
        iterations: Weiszfeld iterations, run exactly (default 4; no early stop).
        nu: the smoothing nu > 0 (default 1e-6).
    """

    def __init__(self, iterations: int = 4, nu: float = 1e-6) -> None:
        super().__init__()
        self.iterations = iterations
        self.nu = nu

    def problems(self, env: DefenseSetup) -> list[tuple[str, object, str]]:
        found = []
        if self.iterations < 1:
            found.append(("defense.iterations", self.iterations, "an integer >= 1"))
        if not self.nu > 0:
            found.append(("defense.nu", self.nu, "a number > 0"))
        return found

    def aggregate(self, updates: Tensor, num_samples: Tensor, ctx: RoundContext) -> Aggregate:
        points = updates.double()
        alpha = sample_weights(num_samples, torch.float64).to(updates.device)
        median = alpha @ points
        weights = alpha
        for _ in range(self.iterations):
            beta = alpha / torch.linalg.vector_norm(points - median, dim=1).clamp_min(self.nu)
            weights = beta / beta.sum()
            median = weights @ points
        objective = float(alpha @ torch.linalg.vector_norm(points - median, dim=1))
        return Aggregate(median.to(updates.dtype), weights.to(updates.dtype),
                         none_excluded(len(updates), updates.device), {"objective": objective})
