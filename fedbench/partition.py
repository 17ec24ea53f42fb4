"""Splitting the clients' pool over clients: IID, Dirichlet label skew, pathological shards.

All three are seeded by the run seed and return one index tensor per client; every
sample of the pool goes to at most one client.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from fedbench.errors import FedbenchError
from fedbench.seeding import numpy_rng


@dataclass
class PartitionConfig:
    """How the clients' pool is split.

    Args:
        scheme: iid, dirichlet (label skew, the papers' setting) or shards (k classes per client).
        beta: Dirichlet concentration; smaller is more heterogeneous (papers: 0.5 and 0.3).
        min_size: Dirichlet draws are repeated until every client holds at least this many samples.
        shards_per_client: shards scheme: classes (shards) per client.
    """

    scheme: Literal["iid", "dirichlet", "shards"] = "dirichlet"
    beta: float = 0.5
    min_size: int = 10
    shards_per_client: int = 2


def iid_partition(num_samples: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A random permutation cut into ``num_clients`` near-equal parts."""
    return [part.copy() for part in np.array_split(rng.permutation(num_samples), num_clients)]


def dirichlet_partition(
    labels: np.ndarray,
    num_clients: int,
    beta: float,
    min_size: int,
    rng: np.random.Generator,
    max_draws: int = 1000,
) -> list[np.ndarray]:
    """Label skew: for each class, shares over clients drawn from Dir(beta * 1).

    Follows the published SDFC/FDCR code (and NIID-Bench): while drawing, a client that
    already holds ``N / num_clients`` samples gets no share of later classes; the whole
    draw is repeated until every client holds at least ``min_size`` samples.
    """
    num_samples = len(labels)
    classes = np.unique(labels)
    cap = num_samples / num_clients
    for _ in range(max_draws):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for k in classes:
            idx_k = np.flatnonzero(labels == k)
            rng.shuffle(idx_k)
            shares = rng.dirichlet(np.full(num_clients, beta))
            shares = shares * np.array([len(p) < cap for p in parts])
            shares = shares / shares.sum()
            cuts = (np.cumsum(shares) * len(idx_k)).astype(int)[:-1]
            for part, chunk in zip(parts, np.split(idx_k, cuts)):
                part.extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [rng.permutation(np.asarray(p, dtype=np.int64)) for p in parts]
    raise FedbenchError(
        f"partition.min_size={min_size}: no Dirichlet(beta={beta}) draw in {max_draws} gave every one of "
        f"{num_clients} clients {min_size} samples out of {num_samples}; lower min_size or raise beta"
    )


def shard_partition(
    labels: np.ndarray, num_clients: int, shards_per_client: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Pathological non-IID (McMahan et al., 2017): sort by label, cut into
    ``num_clients * shards_per_client`` equal shards, give each client that many random shards."""
    order = np.argsort(labels, kind="stable")
    shards = np.array_split(order, num_clients * shards_per_client)
    assignment = rng.permutation(len(shards)).reshape(num_clients, shards_per_client)
    return [np.concatenate([shards[s] for s in row]) for row in assignment]


def partition_clients(labels: Tensor, num_clients: int, config: PartitionConfig, seed: int) -> list[Tensor]:
    """One int64 index tensor (into the clients' pool) per client."""
    rng = numpy_rng(seed, "partition")
    y = labels.cpu().numpy()
    if config.scheme == "iid":
        parts = iid_partition(len(y), num_clients, rng)
    elif config.scheme == "dirichlet":
        parts = dirichlet_partition(y, num_clients, config.beta, config.min_size, rng)
    else:
        parts = shard_partition(y, num_clients, config.shards_per_client, rng)
    return [torch.as_tensor(p, dtype=torch.int64) for p in parts]


def class_counts(labels: Tensor, parts: list[Tensor], num_classes: int) -> list[list[int]]:
    """Samples per class per client: the partition summary that is logged and saved."""
    y = labels.cpu()
    return [torch.bincount(y[p], minlength=num_classes).tolist() for p in parts]
