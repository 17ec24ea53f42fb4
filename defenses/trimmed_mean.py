"""Coordinate-wise trimmed mean (Yin et al., ICML 2018)."""

from __future__ import annotations

import torch
from torch import Tensor

from defenses.base import DEFENSES, Aggregate, Defense, DefenseSetup, RoundContext, coordinate_share, none_excluded


@DEFENSES.register("trimmed_mean")
class TrimmedMean(Defense):
    """Per coordinate: drop the k largest and the k smallest of the n values, take the
    unweighted mean of the remaining ``n - 2k``. ``k = floor(beta * n)``, or ``k = f``
    when ``f`` is given. Requires ``2k < n``.

    No client is excluded as a whole; a client's verdict weight is the share of
    coordinates its value was kept on, times ``1 / (n - 2k)``.

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
        values, index = torch.sort(updates, dim=0)
        kept = slice(k, n - k)
        update = values[kept].mean(dim=0)
        weights = coordinate_share(index[kept], n, 1.0 / (n - 2 * k)).to(updates.dtype)
        return Aggregate(update, weights, none_excluded(n, updates.device), {"trimmed_per_side": k})
