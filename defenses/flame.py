"""FLAME (Nguyen et al., USENIX Security 2022): cluster, clip, add noise."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from defenses.base import DEFENSES, Aggregate, Defense, DefenseSetup, RoundContext


def cosine_distances(updates: Tensor) -> np.ndarray:
    """``1 - cos(u_i, u_j)`` in float64, ``[n, n]``, clipped to [0, 2]."""
    points = updates.double()
    unit = points / torch.linalg.vector_norm(points, dim=1, keepdim=True).clamp_min(1e-12)
    return (1.0 - unit @ unit.T).clamp(0.0, 2.0).cpu().numpy()


def majority_cluster(distances: np.ndarray) -> np.ndarray:
    """Members (bool ``[n]``) of the largest HDBSCAN cluster (scikit-learn) with
    ``min_cluster_size = n // 2 + 1``, ``min_samples = 1`` and a single cluster allowed;
    every client when n < 3 or when no cluster forms."""
    from sklearn.cluster import HDBSCAN

    n = len(distances)
    if n < 3:
        return np.ones(n, dtype=bool)
    labels = HDBSCAN(min_cluster_size=n // 2 + 1, min_samples=1, metric="precomputed",
                     allow_single_cluster=True, copy=True).fit(distances).labels_
    clustered = labels[labels >= 0]
    if len(clustered) == 0:
        return np.ones(n, dtype=bool)
    return labels == np.bincount(clustered).argmax()


@DEFENSES.register("flame")
class FLAME(Defense):
    """1. Pairwise cosine distances ``1 - cos(u_i, u_j)`` of the updates; HDBSCAN
    (scikit-learn) with ``min_cluster_size = n/2 + 1`` (integer division), ``min_samples =
    1``, a single cluster allowed; the largest cluster is kept, everyone else excluded.
    2. ``S = median_i ||u_i||`` over ALL of the round's updates; every kept update is
    clipped to ``u_i * min(1, S / ||u_i||)``. 3. The aggregate is the unweighted mean of
    the clipped kept updates plus noise ``N(0, (lambda * S)^2 I)`` (lambda = 0.001 for
    image classification, the paper's choice), drawn from the round's defense stream.

    Conventions: the paper's Algorithm 1 writes the cosine distances on the local models;
    we take them on the updates (local minus global), since every local model shares the
    global model, which pushes all model cosines toward 1. The noise is added to the
    aggregate update, i.e. to the new global model when ``server_lr = 1`` (the paper's
    setting). HDBSCAN may also leave benign updates out as noise when their directions
    spread (on a 7-update toy case it drops one at 8.5 degrees from four within 2-6).
    Verdict weights: 1 / (kept clients) each.

    Args:
        noise_lambda: lambda of the noise (0 turns it off).
    """

    def __init__(self, noise_lambda: float = 0.001) -> None:
        super().__init__()
        self.noise_lambda = noise_lambda

    def problems(self, env: DefenseSetup) -> list[tuple[str, object, str]]:
        if not self.noise_lambda >= 0:
            return [("defense.noise_lambda", self.noise_lambda, "a number >= 0")]
        return []

    def aggregate(self, updates: Tensor, num_samples: Tensor, ctx: RoundContext) -> Aggregate:
        n = len(updates)
        kept = torch.as_tensor(majority_cluster(cosine_distances(updates)), device=updates.device)
        norms = torch.linalg.vector_norm(updates, dim=1)
        bound = norms.median() if n % 2 else norms.sort().values[n // 2 - 1 : n // 2 + 1].mean()
        factors = torch.clamp(bound / norms.clamp_min(1e-12), max=1.0)
        clipped = updates[kept] * factors[kept].unsqueeze(1)
        update = clipped.mean(dim=0)
        if self.noise_lambda > 0:
            noise = torch.randn(update.shape, generator=ctx.generator, device=update.device, dtype=update.dtype)
            update = update + self.noise_lambda * bound * noise
        weights = kept.to(updates.dtype) / kept.sum()
        info = {"kept": int(kept.sum()), "clip_bound": float(bound)}
        return Aggregate(update, weights, ~kept, info)
