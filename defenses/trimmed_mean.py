"""Coordinate-wise trimmed mean (Yin et al., ICML 2018)."""

from __future__ import annotations

from torch import Tensor

from defenses.base import DEFENSES, Aggregate, Defense, DefenseSetup, RoundContext, none_excluded
from fedbench.order_statistics import trimmed_mean


def coordinate_verdict(inside: Tensor, dtype) -> Tensor:
    """Verdict weights of a coordinate-wise rule: each client's count of coordinates whose
    value lies in the kept range, normalised to sum to 1."""
    counts = inside.to(dtype)
    return counts / counts.sum()


@DEFENSES.register("trimmed_mean")
class TrimmedMean(Defense):
    """Per coordinate: drop the k largest and the k smallest of the n values, take the
    unweighted mean of the remaining ``n - 2k``. ``k = floor(beta * n)``, or ``k = f``
    when ``f`` is given. Requires ``2k < n``.

    No client is excluded as a whole. A client's verdict weight is the number of
    coordinates on which its value lies within the kept range ``[x_(k), x_(n-k-1)]``,
    normalised over clients (ties at the bounds all count).

    Args:
        beta: fraction trimmed from EACH side (default 0.1).
        f: trim exactly f values per side instead of a fraction.
    """

    def __init__(self, beta: float = 0.1, f: int | None = None) -> None:
        super().__init__()
        self.beta = beta
        self.f = f

    def trimmed(self, n: int) -> int:
        return self.f if self.f is not None else int(self.beta * n)

    def problems(self, env: DefenseSetup) -> list[tuple[str, object, str]]:
        n = env.clients_per_round
        found = []
        if not 0.0 <= self.beta < 0.5:
            found.append(("defense.beta", self.beta, "a fraction per side in [0, 0.5)"))
        elif self.f is not None and not 0 <= self.f < (n + 1) // 2:
            found.append(("defense.f", self.f, f"None or an integer with 2f < n = {n}"))
        return found

    def aggregate(self, updates: Tensor, num_samples: Tensor, ctx: RoundContext) -> Aggregate:
        n = len(updates)
        k = min(self.trimmed(n), (n - 1) // 2)
        update, inside = trimmed_mean(updates, k)
        weights = coordinate_verdict(inside, updates.dtype)
        return Aggregate(update, weights, none_excluded(n, updates.device), {"trimmed_per_side": k})
