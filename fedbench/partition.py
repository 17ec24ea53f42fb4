"""Splitting the clients' pool over clients: a registry of schemes (``--partition.scheme``).

A scheme is one function ``(labels, num_clients, config, rng) -> one index array per
client`` registered with ``@PARTITIONS.register(name)``; ``rng`` is seeded by the run
seed, so a scheme is reproducible by construction. Every sample of the pool goes to at
most one client. Built in: iid, dirichlet (label skew), shards (pathological label skew),
quantity_skew (IID labels, Dirichlet client sizes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from fedbench.errors import FedbenchError, Problem, Problems
from fedbench.registry import Registry
from fedbench.seeding import numpy_rng


@dataclass
class PartitionConfig:
    """How the clients' pool is split.

    Args:
        scheme: a registered scheme: iid, dirichlet (label skew, the papers' setting), shards
            (k classes per client), quantity_skew (IID labels, Dirichlet sizes), or module.function of your own.
        beta: Dirichlet concentration of dirichlet and quantity_skew; smaller is more heterogeneous
            (papers: 0.5 and 0.3).
        min_size: Dirichlet draws are repeated until every client holds at least this many samples.
        shards_per_client: shards scheme: classes (shards) per client.
    """

    scheme: str = "dirichlet"
    beta: float = 0.5
    min_size: int = 10
    shards_per_client: int = 2

    def problems(self) -> list[Problem]:
        found = Problems(PARTITIONS.problems("partition.scheme", self.scheme))
        found.need(self.beta > 0, "partition.beta", self.beta, "a concentration > 0")
        found.need(self.min_size >= 1, "partition.min_size", self.min_size,
                   "an integer >= 1 (a client without samples cannot train)")
        found.need(self.shards_per_client >= 1, "partition.shards_per_client", self.shards_per_client,
                   "an integer >= 1")
        return found


PartitionScheme = Callable[[np.ndarray, int, PartitionConfig, np.random.Generator], list[np.ndarray]]
PARTITIONS: Registry[PartitionScheme] = Registry("partition scheme")


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


@PARTITIONS.register("iid")
def iid(labels: np.ndarray, num_clients: int, config: PartitionConfig, rng: np.random.Generator) -> list[np.ndarray]:
    """IID: see :func:`iid_partition`."""
    return iid_partition(len(labels), num_clients, rng)


@PARTITIONS.register("dirichlet")
def dirichlet(labels: np.ndarray, num_clients: int, config: PartitionConfig,
              rng: np.random.Generator) -> list[np.ndarray]:
    """Label skew Dir(beta): see :func:`dirichlet_partition`."""
    return dirichlet_partition(labels, num_clients, config.beta, config.min_size, rng)


@PARTITIONS.register("shards")
def shards(labels: np.ndarray, num_clients: int, config: PartitionConfig, rng: np.random.Generator) -> list[np.ndarray]:
    """Pathological shards: see :func:`shard_partition`."""
    return shard_partition(labels, num_clients, config.shards_per_client, rng)


@PARTITIONS.register("quantity_skew")
def quantity_skew(labels: np.ndarray, num_clients: int, config: PartitionConfig,
                  rng: np.random.Generator, max_draws: int = 1000) -> list[np.ndarray]:
    """Quantity skew (Li et al., ICDE 2022, NIID-Bench): client sizes are the shares
    ``q ~ Dir(beta * 1)`` of a random permutation of the pool (cut at ``floor(cumsum(q) * N)``),
    so labels stay IID and only the amount of data differs. The draw is repeated until
    every client holds at least ``min_size`` samples."""
    num_samples = len(labels)
    for _ in range(max_draws):
        shares = rng.dirichlet(np.full(num_clients, config.beta))
        cuts = (np.cumsum(shares) * num_samples).astype(int)[:-1]
        if min(np.diff(np.concatenate([[0], cuts, [num_samples]]))) >= config.min_size:
            return [part.copy() for part in np.split(rng.permutation(num_samples), cuts)]
    raise FedbenchError(
        f"partition.min_size={config.min_size}: no Dirichlet(beta={config.beta}) size draw in {max_draws} gave "
        f"every one of {num_clients} clients {config.min_size} samples out of {num_samples}; lower min_size or "
        "raise beta"
    )


def partition_clients(labels: Tensor, num_clients: int, config: PartitionConfig, seed: int) -> list[Tensor]:
    """One int64 index tensor (into the clients' pool) per client."""
    scheme = PARTITIONS.resolve(config.scheme)
    parts = scheme(labels.cpu().numpy(), num_clients, config, numpy_rng(seed, "partition"))
    return [torch.as_tensor(p, dtype=torch.int64) for p in parts]


def class_counts(labels: Tensor, parts: list[Tensor], num_classes: int) -> list[list[int]]:
    """Samples per class per client: the partition summary that is logged and saved."""
    y = labels.cpu()
    return [torch.bincount(y[p], minlength=num_classes).tolist() for p in parts]
