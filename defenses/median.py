"""Coordinate-wise median (Yin et al., ICML 2018)."""

from __future__ import annotations

import torch
from torch import Tensor

from defenses.base import DEFENSES, Aggregate, Defense, RoundContext, coordinate_share, none_excluded


@DEFENSES.register("median")
class Median(Defense):
    """Per coordinate, the median of the n values; for even n the mean of the two
    middle values (not the lower one, which ``torch.median`` returns). Unweighted.

    No client is excluded as a whole; a client's verdict weight is the share of
    coordinates its value was (one of) the median, each middle value weighing 1/2 for even n.
    """

    def aggregate(self, updates: Tensor, num_samples: Tensor, ctx: RoundContext) -> Aggregate:
        n = len(updates)
        values, index = torch.sort(updates, dim=0)
        middle = slice((n - 1) // 2, n // 2 + 1)
        update = values[middle].mean(dim=0)
        rows = index[middle]
        weights = coordinate_share(rows, n, 1.0 / rows.shape[0]).to(updates.dtype)
        return Aggregate(update, weights, none_excluded(n, updates.device))
