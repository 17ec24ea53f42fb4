"""Coordinate-wise trimmed mean (Yin et al., ICML 2018)."""

from __future__ import annotations

from torch import Tensor

from defenses.base import DEFENSES, Aggregate, Defense, DefenseSetup, RoundContext, assumed_malicious, \
    none_excluded
from fedbench.order_statistics import trimmed_mean


def coordinate_verdict(inside: Tensor, dtype) -> Tensor:
    """Verdict weights of a coordinate-wise rule: each client's count of coordinates whose
    value lies in the kept range, normalised to sum to 1."""
    counts = inside.to(dtype)
    return counts / counts.sum()


@DEFENSES.register("trimmed_mean")
class TrimmedMean(Defense):
    """Per coordinate: drop the k largest and the k smallest of the n values, take the
    unweighted mean of the remaining ``n - 2k``. By default ``k`` = the expected number of
    attackers among the selected clients, the same f that Krum and Multi-Krum get (the
    oracle knowledge the papers assume; Yin et al. require beta >= f / n per side);
    ``f`` trims exactly f values per side, ``beta`` a fraction ``k = floor(beta * n)``.
    Requires ``2k < n`` (k is capped at ``(n - 1) // 2`` should screening leave fewer updates).

    No client is excluded as a whole. A client's verdict weight is the number of
    coordinates on which its value lies within the kept range ``[x_(k), x_(n-k-1)]``,
    normalised over clients (ties at the bounds all count).

    Args:
        f: values trimmed per side; None (default) = the expected number of attackers.
        beta: fraction trimmed from EACH side instead (None = use f).
    """

    def __init__(self, f: int | None = None, beta: float | None = None) -> None:
        super().__init__()
        self.f = f
        self.beta = beta

    def trimmed(self, n: int) -> int:
        if self.beta is not None:
            return int(self.beta * n)
        return assumed_malicious(self.f, self.env)

    def problems(self, env: DefenseSetup) -> list[tuple[str, object, str]]:
        n = env.clients_per_round
        found = []
        if self.beta is not None and self.f is not None:
            found.append(("defense.beta", self.beta, "None when defense.f is given (one of the two)"))
        elif self.beta is not None and not 0.0 <= self.beta < 0.5:
            found.append(("defense.beta", self.beta, "None or a fraction per side in [0, 0.5)"))
        elif self.beta is None and not 0 <= assumed_malicious(self.f, env) < (n + 1) // 2:
            shown = self.f if self.f is not None else f"None (expected attackers = {assumed_malicious(None, env)})"
            found.append(("defense.f", shown, f"an integer with 2f < n = {n} clients per round"))
        return found

    def aggregate(self, updates: Tensor, num_samples: Tensor, ctx: RoundContext) -> Aggregate:
        n = len(updates)
        k = min(self.trimmed(n), (n - 1) // 2)
        update, inside = trimmed_mean(updates, k)
        weights = coordinate_verdict(inside, updates.dtype)
        return Aggregate(update, weights, none_excluded(n, updates.device), {"trimmed_per_side": k})
