"""FDCR (Huang et al., NeurIPS 2024, "Parameter Disparities Dissection for Backdoor Defense
in Heterogeneous Federated Learning"), without the published code's use of ground truth."""

from __future__ import annotations

import warnings
import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from attacks.base import ClientInfo
from defenses.base import DEFENSES, Aggregate, Batches, ClientHook, Defense, DefenseSetup, HookCall, \
    RoundContext, sample_weights
from fedbench.fisher import FisherEstimator, cohort_fishers

FISHER = "fdcr_fisher"


def finch_first_partition(values: np.ndarray) -> np.ndarray:
    """Level-0 FINCH labels (Sarfraz et al., CVPR 2019; the ``finch-clust`` package) of the
    rows of ``values``, Euclidean: points joined through first-neighbour links."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # finch-clust warns that optional ANN packages are missing
        from finch import FINCH

        labels, _, _ = FINCH(values, distance="euclidean", verbose=False)
    return np.asarray(labels)[:, 0]


class FDCRClientHook(ClientHook):
    """After local training every client uploads its diagonal Fisher of the trained model on
    its own training data (poisoned for an attacker that poisons), one value per parameter.
    The engine calls ``after_training_together`` (a cohort's clients' Fishers computed
    together); ``after_training`` is its one-client form."""

    upload_keys = (FISHER,)

    def __init__(self, estimator: FisherEstimator) -> None:
        self.estimator = estimator

    def upload_shape(self, key: str, dim: int) -> tuple[int, ...]:
        return (dim,)

    def after_training(
        self, client: ClientInfo, model: nn.Module, local_batches: Batches, server_batches: Batches | None
    ) -> dict[str, Tensor]:
        return self.after_training_together([HookCall(client, model, local_batches, server_batches)])[0]

    def after_training_together(self, calls: list[HookCall]) -> list[dict[str, Tensor]]:
        """Every client's Fisher (a cohort's computed together, :func:`~fedbench.fisher.cohort_fishers`)."""
        fishers = cohort_fishers([call.model for call in calls], [call.local_batches() for call in calls],
                                 self.estimator)
        return [{FISHER: torch.cat([f.reshape(-1) for f in fisher])} for fisher in fishers]


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
        importance = MinMaxImportance(ctx.uploads[FISHER])
        distances = self.weighted_distances(updates, p, importance)
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
        aggregate = torch.empty(updates.shape[1], dtype=updates.dtype, device=updates.device)
        for chunk in importance.chunks():
            rescaled = 2 * torch.sigmoid(importance[chunk]) * updates[:, chunk].double()
            aggregate[chunk] = (kept_p @ rescaled).to(updates.dtype)
        return Aggregate(aggregate, kept_p.to(updates.dtype), excluded,
                         {"distances": distances.tolist(), "filtered": True})

    @staticmethod
    def weighted_distances(updates: Tensor, p: Tensor, importance: "MinMaxImportance") -> Tensor:
        """``||I_k * u_k - sum_j p_j I_j * u_j||_2`` in float64, summed chunk by chunk."""
        squares = torch.zeros(len(updates), dtype=torch.float64, device=updates.device)
        for chunk in importance.chunks():
            weighted = importance[chunk] * updates[:, chunk].double()
            squares += ((weighted - p @ weighted) ** 2).sum(dim=1)
        return squares.sqrt()


class MinMaxImportance:
    """Each client's min-max normalised Fisher, ``I_k = (F_k - min F_k) / (max F_k - min F_k)``
    over all its coordinates (zeros when F_k is constant), in float64, handed out
    a block of coordinates at a time: float64 [n, d] copies of ResNet-18-size uploads need
    about 18 GB at n = 50, a block of 2^20 coordinates 0.4 GB."""

    CHUNK = 1 << 20

    def __init__(self, fishers) -> None:
        self.fishers = list(fishers)
        self.low = [float(f.min()) for f in self.fishers]  # exact: float32 values fit a double
        self.high = [float(f.max()) for f in self.fishers]
        self.dim = int(self.fishers[0].numel())

    def chunks(self):
        return (slice(start, min(start + self.CHUNK, self.dim)) for start in range(0, self.dim, self.CHUNK))

    def __getitem__(self, chunk: slice) -> Tensor:
        rows = []
        for fisher, low, high in zip(self.fishers, self.low, self.high):
            block = fisher[chunk].double()
            rows.append((block - low) / (high - low) if high > low else torch.zeros_like(block))
        return torch.stack(rows)
