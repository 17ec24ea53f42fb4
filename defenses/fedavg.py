"""FedAvg (McMahan et al., AISTATS 2017): the no-defense baseline."""

from __future__ import annotations

from torch import Tensor

from defenses.base import DEFENSES, Aggregate, Defense, RoundContext, none_excluded, sample_weights


@DEFENSES.register("fedavg")
class FedAvg(Defense):
    """Sample-count weighted mean: ``sum_i (n_i / N) * g_i`` with ``N = sum_i n_i``.
    Excludes no client."""

    def aggregate(self, updates: Tensor, num_samples: Tensor, ctx: RoundContext) -> Aggregate:
        weights = sample_weights(num_samples).to(updates.device, updates.dtype)
        return Aggregate(weights @ updates, weights, none_excluded(len(updates), updates.device))
