"""FDCR (Huang et al., NeurIPS 2024, "Parameter Disparities Dissection for Backdoor Defense
in Heterogeneous Federated Learning"), without the published code's use of ground truth."""

from __future__ import annotations

import warnings
import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from attacks.base import ClientInfo
from defenses.base import DEFENSES, Aggregate, Batches, ClientHook, Defense, DefenseSetup, RoundContext, \
    sample_weights
from fedbench.fisher import FisherEstimator, diagonal_fisher

FISHER = "fdcr_fisher"


def finch_first_partition(values: np.ndarray) -> np.ndarray:
    """Level-0 FINCH labels (Sarfraz et al., CVPR 2019; the ``finch-clust`` package) of the
    rows of ``values``, Euclidean: points joined through first-neighbour links."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # finch-clust warns that optional ANN packages are missing
        from finch import FINCH

        labels, _, _ = FINCH(values, distance="euclidean", verbose=False)
    return np.asarray(labels)[:, 0]


def minmax(vector: Tensor) -> Tensor:
    """``(F - min F) / (max F - min F)`` over the whole vector; zeros when F is constant."""
    low, high = vector.min(), vector.max()
    return (vector - low) / (high - low) if high > low else torch.zeros_like(vector)


class FDCRClientHook(ClientHook):
    """After local training every client uploads its diagonal Fisher of the trained model on
    its own training data (poisoned for an attacker that poisons), one value per parameter."""

    upload_keys = (FISHER,)

    def __init__(self, estimator: FisherEstimator) -> None:
        self.estimator = estimator

    def upload_shape(self, key: str, dim: int) -> tuple[int, ...]:
        return (dim,)

    def after_training(
        self, client: ClientInfo, model: nn.Module, local_batches: Batches, server_batches: Batches | None
    ) -> dict[str, Tensor]:
        fisher = diagonal_fisher(model, local_batches(), self.estimator)
        return {FISHER: torch.cat([f.reshape(-1) for f in fisher])}


@DEFENSES.register("fdcr")
class FDCR(Defense):
    """Clients upload their diagonal Fisher F_k (:class:`FDCRClientHook`; the SDFC estimator,
    ``published`` by default: the square of the mean batch-mean gradient). The server:

    1. ``I_k = minmax(F_k)`` over all of client k's parameters;
    2. Fisher-weighted updates ``w_k = I_k * u_k`` and their sample-weighted mean
       ``w_bar = sum_k p_k w_k`` (p_k = n_k / sum n over the round's clients);
    3. ``d_k = ||w_k - w_bar||_2``; FINCH (finch-clust) on the 1-D d, first partition;
       with one cluster nothing is filtered and the aggregate is plain FedAvg; otherwise
       the cluster with the largest mean d is excluded;
    4. the kept updates are rescaled per parameter, ``u_k <- 2 * sigmoid(I_k) * u_k``, and
       averaged with p renormalised over them.

    Honest implementation: the server never uses which clients are malicious. The
    published code (``Server/OurRandomControl.py``) replaces the attackers' Fisher with
    standard normal noise using the ground truth before step 1; an independent
    reproduction without it reports TPR 21% and ASR 50-59%. The published code works on
    ``(global - local) / lr``; a sign and a constant factor change neither the distances'
    order nor FINCH, so we use the updates. Verdict weights: the renormalised p.

    Args:
        estimator: the clients' Fisher estimator: published (default) or empirical.
    """

    def __init__(self, estimator: FisherEstimator = "published") -> None:
        super().__init__()
        self.estimator = estimator
        self.hook = FDCRClientHook(estimator)

    def problems(self, env: DefenseSetup) -> list[tuple[str, object, str]]:
        if self.estimator not in ("published", "empirical"):
            return [("defense.estimator", self.estimator, "one of: published, empirical")]
        return []

    def client_hook(self) -> ClientHook:
        return self.hook

    def aggregate(self, updates: Tensor, num_samples: Tensor, ctx: RoundContext) -> Aggregate:
        n = len(updates)
        p = sample_weights(num_samples, torch.float64).to(updates.device)
        importance = torch.stack([minmax(f.double()) for f in ctx.uploads[FISHER]])
        weighted = importance * updates.double()
        distances = torch.linalg.vector_norm(weighted - p @ weighted, dim=1)
        excluded = torch.zeros(n, dtype=torch.bool, device=updates.device)
        if n >= 3:
            labels = finch_first_partition(distances.cpu().numpy().reshape(-1, 1))
            if len(set(labels.tolist())) > 1:
                means = {label: distances.cpu().numpy()[labels == label].mean() for label in set(labels.tolist())}
                worst = max(means, key=means.get)
                excluded = torch.as_tensor(labels == worst, device=updates.device)
        if not excluded.any():
            return Aggregate(p.to(updates.dtype) @ updates, p.to(updates.dtype), excluded,
                             {"distances": distances.tolist(), "filtered": False})
        kept_p = torch.where(excluded, 0.0, p)
        kept_p = kept_p / kept_p.sum()
        rescaled = 2 * torch.sigmoid(importance) * updates.double()
        return Aggregate((kept_p @ rescaled).to(updates.dtype), kept_p.to(updates.dtype), excluded,
                         {"distances": distances.tolist(), "filtered": True})
