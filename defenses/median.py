"""Coordinate-wise median (Yin et al., ICML 2018)."""

from __future__ import annotations

from torch import Tensor

from defenses.base import DEFENSES, Aggregate, Defense, RoundContext, none_excluded
from defenses.trimmed_mean import coordinate_verdict
from fedbench.order_statistics import trimmed_mean


@DEFENSES.register("median")
class Median(Defense):
    """Per coordinate, the median of the n values; for even n the mean of the two
    middle values (not the lower one, which ``torch.median`` returns). Unweighted.

    No client is excluded as a whole. A client's verdict weight is the number of
    coordinates on which its value is the median (for even n: lies between the two
    middle values), normalised over clients.
    """

    def aggregate(self, updates: Tensor, num_samples: Tensor, ctx: RoundContext) -> Aggregate:
        n = len(updates)
        update, inside = trimmed_mean(updates, (n - 1) // 2)
        return Aggregate(update, coordinate_verdict(inside, updates.dtype), none_excluded(n, updates.device))
