"""Centered clipping (Karimireddy, He and Jaggi, ICML 2021)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from defenses.base import DEFENSES, Aggregate, Defense, DefenseSetup, RoundContext, none_excluded


@DEFENSES.register("centered_clipping")
class CenteredClipping(Defense):
    """Starting from the previous round's aggregate v (zero in the first round), ``L``
    times ``v <- v + (1/n) sum_k clip(u_k - v, tau)`` with ``clip(z, tau) = z *
    min(1, tau / ||z||)``; the aggregate is the final v and becomes the next round's
    start (state, part of checkpoints). The paper applies it to worker momenta; here the
    updates play that role, and v carries over as the paper's previous aggregate does.

    No client is excluded; a client's verdict weight is its clipping factor
    ``min(1, tau / ||u_k - v||)`` of the last iteration, normalised.

    Args:
        tau: the clipping radius (default 10; scale it to your update norms).
        iterations: L (default 1).
    """

    def __init__(self, tau: float = 10.0, iterations: int = 1) -> None:
        super().__init__()
        self.tau = tau
        self.iterations = iterations
        self.previous: Tensor | None = None

    def problems(self, env: DefenseSetup) -> list[tuple[str, object, str]]:
        found = []
        if not self.tau > 0:
            found.append(("defense.tau", self.tau, "a radius > 0"))
        if self.iterations < 1:
            found.append(("defense.iterations", self.iterations, "an integer >= 1"))
        return found

    def aggregate(self, updates: Tensor, num_samples: Tensor, ctx: RoundContext) -> Aggregate:
        n = len(updates)
        centre = self.previous.to(updates) if self.previous is not None else torch.zeros_like(updates[0])
        factors = torch.ones(n, device=updates.device, dtype=updates.dtype)
        for _ in range(self.iterations):
            offsets = updates - centre
            norms = torch.linalg.vector_norm(offsets, dim=1)
            factors = torch.clamp(self.tau / norms.clamp_min(1e-12), max=1.0)
            centre = centre + (factors.unsqueeze(1) * offsets).mean(dim=0)
        self.previous = centre.detach().clone()
        weights = factors / factors.sum()
        info = {"clipped": int((factors < 1).sum())}
        return Aggregate(centre, weights, none_excluded(n, updates.device), info)

    def state_dict(self) -> dict[str, Any]:
        return {} if self.previous is None else {"previous": self.previous.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.previous = state.get("previous")
