"""Norm clipping with optional weak differential privacy (Sun et al., 2019,
"Can You Really Backdoor Federated Learning?")."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from defenses.base import DEFENSES, Aggregate, Defense, DefenseSetup, RoundContext, none_excluded, sample_weights


@DEFENSES.register("norm_clipping")
class NormClipping(Defense):
    """``g_i' = g_i * min(1, M / ||g_i||_2)``;
    ``aggregate = sum_i (n_i / N) g_i' + N(0, sigma^2 I)``.

    ``M`` is ``threshold`` when a number, or, with ``threshold="median"``, the median of
    ``||g_i||_2`` over ALL n updates of this round (benign and malicious alike: the server
    cannot tell them apart); for even n the mean of the two middle norms. Noise is added
    once to the aggregate, per coordinate, from the round's defense stream. Excludes no
    client; the verdict weights are the sample-count weights.

    Args:
        threshold: the norm bound M, or "median".
        sigma: std of the Gaussian noise added to the aggregate; 0 = no noise.
    """

    def __init__(self, threshold: float | Literal["median"] = "median", sigma: float = 0.0) -> None:
        super().__init__()
        self.threshold = threshold
        self.sigma = sigma

    def problems(self, env: DefenseSetup) -> list[tuple[str, object, str]]:
        found = []
        if self.threshold != "median" and not (isinstance(self.threshold, (int, float)) and self.threshold > 0):
            found.append(("defense.threshold", self.threshold, 'a norm > 0, or "median"'))
        if self.sigma < 0:
            found.append(("defense.sigma", self.sigma, "a std >= 0"))
        return found

    def aggregate(self, updates: Tensor, num_samples: Tensor, ctx: RoundContext) -> Aggregate:
        norms = torch.linalg.vector_norm(updates, dim=1)
        if self.threshold == "median":
            middle = norms.sort().values
            n = len(norms)
            bound = middle[(n - 1) // 2 : n // 2 + 1].mean()
        else:
            bound = torch.as_tensor(float(self.threshold), device=updates.device, dtype=updates.dtype)
        factors = torch.clamp(bound / norms.clamp_min(torch.finfo(updates.dtype).tiny), max=1.0)
        weights = sample_weights(num_samples).to(updates.device, updates.dtype)
        update = (weights * factors) @ updates
        if self.sigma > 0:
            update = update + self.sigma * torch.randn(
                update.shape, generator=ctx.generator, device=update.device, dtype=update.dtype
            )
        info = {"threshold": float(bound), "clipped": int((factors < 1).sum())}
        return Aggregate(update, weights, none_excluded(len(updates), updates.device), info)
