"""FoolsGold (Fung, Yoon and Beschastnikh, RAID 2020)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from defenses.base import DEFENSES, Aggregate, Defense, DefenseSetup, RoundContext


def foolsgold_weights(histories: Tensor, confidence: float = 1.0) -> Tensor:
    """The paper's Algorithm 1 on the clients' update histories ``[n, d]`` (float64):

    1. ``cs_ij`` = cosine similarity of histories i and j (0 on the diagonal);
       ``v_i = max_j cs_ij``;
    2. pardoning: ``cs_ij *= v_i / v_j`` wherever ``v_j > v_i``;
    3. ``alpha_i = 1 - max_j cs_ij``, clipped to [0, 1] (values below 1e-9, rounding of
       parallel histories, set to 0), divided by its maximum, and values of exactly 1 set
       to 0.99;
    4. logit: ``alpha_i = kappa * (ln(alpha_i / (1 - alpha_i)) + 0.5)``, clipped to [0, 1]
       (kappa = ``confidence``).
    """
    points = histories.double()
    unit = points / torch.linalg.vector_norm(points, dim=1, keepdim=True).clamp_min(1e-12)
    cs = unit @ unit.T
    cs.fill_diagonal_(0.0)
    v = cs.max(dim=1).values
    pardon = v.unsqueeze(0) > v.unsqueeze(1)  # [i, j]: v_j > v_i
    cs = torch.where(pardon, cs * v.unsqueeze(1) / v.unsqueeze(0).clamp_min(1e-12), cs)
    alpha = (1.0 - cs.max(dim=1).values).clamp(0.0, 1.0)
    # Rounding leaves the cosine of two parallel histories a few ulps below 1; rescaling by
    # the maximum would turn that 1e-16 into full weight for perfect sybils.
    alpha = torch.where(alpha < 1e-9, torch.zeros_like(alpha), alpha)
    if alpha.max() > 0:
        alpha = alpha / alpha.max()
    alpha = torch.where(alpha == 1.0, torch.full_like(alpha, 0.99), alpha)
    with torch.no_grad():
        logit = confidence * (torch.log(alpha / (1.0 - alpha)) + 0.5)
    return torch.nan_to_num(logit, nan=0.0, posinf=1.0, neginf=0.0).clamp(0.0, 1.0)


@DEFENSES.register("foolsgold")
class FoolsGold(Defense):
    """Each client's history is the sum of every update it has sent (state, part of
    checkpoints; under client sampling only the selected clients' histories are
    compared). Weights alpha from :func:`foolsgold_weights`; the aggregate is the
    alpha-weighted mean ``sum alpha_k u_k / sum alpha_k`` (the authors' code's weighted
    average; sample counts are not used). Clients with alpha = 0 are excluded; when every
    alpha is 0 the model does not move. The paper's optional feature-importance weighting
    of the similarity is not applied (it targets the output layer of specific models).

    Args:
        confidence: kappa of the logit (paper: 1).
    """

    def __init__(self, confidence: float = 1.0) -> None:
        super().__init__()
        self.confidence = confidence
        self.histories: dict[int, Tensor] = {}

    def problems(self, env: DefenseSetup) -> list[tuple[str, object, str]]:
        if not self.confidence > 0:
            return [("defense.confidence", self.confidence, "a number > 0")]
        return []

    def aggregate(self, updates: Tensor, num_samples: Tensor, ctx: RoundContext) -> Aggregate:
        ids = [int(c) for c in ctx.client_ids]
        for cid, update in zip(ids, updates):
            previous = self.histories.get(cid)
            self.histories[cid] = update.double().clone() if previous is None else previous + update.double()
        alpha = foolsgold_weights(torch.stack([self.histories[c] for c in ids]), self.confidence)
        total = float(alpha.sum())
        weights = (alpha / total if total > 0 else alpha).to(updates.dtype)
        info = {"alpha": alpha.tolist()}
        return Aggregate(weights @ updates, weights, alpha == 0, info)

    def state_dict(self) -> dict[str, Any]:
        return {"histories": {str(k): v.cpu() for k, v in self.histories.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.histories = {int(k): v for k, v in state.get("histories", {}).items()}
