"""Robust learning rate (Ozdayi, Kantarcioglu and Gel, AAAI 2021)."""

from __future__ import annotations

import torch
from torch import Tensor

from defenses.base import DEFENSES, Aggregate, Defense, DefenseSetup, RoundContext, assumed_malicious, \
    none_excluded, sample_weights


@DEFENSES.register("rlr")
class RobustLearningRate(Defense):
    """Per coordinate j, the sign agreement ``s_j = |sum_k sign(u_kj)|`` over the n
    updates; the server learning rate of coordinate j is ``+eta`` where ``s_j >= theta``
    and ``-eta`` otherwise, applied to the FedAvg (sample-count weighted) mean:
    ``aggregate_j = (+1 if s_j >= theta else -1) * mean_j`` (the engine multiplies by
    ``server_lr`` = eta). A backdoor direction pushed by a few clients against the rest
    then gets a negative rate and is unlearned.

    theta: the paper leaves it a hyper-parameter; by default theta = f + 1 with f the
    expected number of attackers (the oracle f every baseline gets): a coordinate whose
    agreement the f attackers alone could produce (benign signs cancelling) gets the
    negative rate. No client is excluded; verdict weights are the FedAvg weights.

    Args:
        theta: the sign-agreement threshold; None = f + 1.
        f: assumed attackers for the default theta; None = the expected number.
    """

    def __init__(self, theta: int | None = None, f: int | None = None) -> None:
        super().__init__()
        self.theta = theta
        self.f = f

    def threshold(self) -> int:
        return self.theta if self.theta is not None else assumed_malicious(self.f, self.env) + 1

    def problems(self, env: DefenseSetup) -> list[tuple[str, object, str]]:
        if self.theta is not None and not 0 <= self.theta <= env.clients_per_round:
            return [("defense.theta", self.theta, f"None (f + 1) or an integer in [0, {env.clients_per_round}]")]
        if self.f is not None and self.f < 0:
            return [("defense.f", self.f, "None or an integer >= 0")]
        return []

    def aggregate(self, updates: Tensor, num_samples: Tensor, ctx: RoundContext) -> Aggregate:
        weights = sample_weights(num_samples, updates.dtype).to(updates.device)
        agreement = torch.sign(updates).sum(dim=0).abs()
        rate = torch.where(agreement >= self.threshold(), 1.0, -1.0).to(updates.dtype)
        info = {"theta": self.threshold(), "negative_share": float((rate < 0).float().mean())}
        return Aggregate(rate * (weights @ updates), weights, none_excluded(len(updates), updates.device), info)
