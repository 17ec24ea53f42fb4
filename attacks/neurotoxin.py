"""Neurotoxin (Zhang et al., ICML 2022): a backdoor hidden in the coordinates benign
clients rarely update, so that it survives after the attack stops."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
from torch import Tensor

from attacks.base import ATTACKS, BorrowedTriggerBackdoor, ClientInfo
from fedbench.params import trainable_parameters


@ATTACKS.register("neurotoxin")
class Neurotoxin(BorrowedTriggerBackdoor):
    """A trigger backdoor whose local training may only move the coordinates outside the
    top ``top_k_percent`` % of the previous round's global update by magnitude
    ``|global_r - global_(r-1)|`` (over all parameters together): the coordinates that
    benign clients update most are frozen at their global values after every optimizer
    step (the projection of the paper's gradient mask; with weight decay the two differ by
    the decay of the frozen coordinates, which the projection undoes). In the first round
    the attacker has seen no global update and nothing is frozen.

    Knowledge: the global models every client downloads (no other client's update). The
    paper's mask ratio 0.95 of coordinates kept (the authors' ``gradmask_ratio``) is
    ``top_k_percent = 5``; the authors' code estimates the benign direction from the
    attacker's clean-data gradient, the paper (and this class) from the global update.

    Args:
        top_k_percent: share of coordinates (percent, 0-100) frozen (default 5).
        trigger: the registered backdoor whose trigger is stamped (default pixel_pattern).
        **kwargs: BackdoorAttack arguments (poison_ratio, target_label, malicious_fraction, ...).
    """

    def __init__(self, top_k_percent: float = 5.0, trigger: str = "pixel_pattern", **kwargs) -> None:
        super().__init__(trigger=trigger, **kwargs)
        self.top_k_percent = top_k_percent
        self.previous_global: Tensor | None = None
        self.frozen: Tensor | None = None

    def problems(self) -> list[tuple[str, object, str]]:
        found = super().problems()
        if not 0 <= self.top_k_percent < 100:
            found.append(("attack.top_k_percent", self.top_k_percent, "a percentage in [0, 100)"))
        return found

    def round_start(self, round_index: int, global_params: Tensor) -> None:
        if self.previous_global is not None:
            change = (global_params - self.previous_global).abs()
            count = math.ceil(self.top_k_percent / 100 * change.numel())
            self.frozen = torch.zeros_like(change, dtype=torch.bool)
            if count:
                self.frozen[torch.topk(change, count).indices] = True
        self.previous_global = global_params.detach().clone()

    def step_hook(self, client: ClientInfo, model: nn.Module) -> Callable[[], None] | None:
        if self.frozen is None or not self.frozen.any():
            return None
        params = trainable_parameters(model)
        starts = [p.detach().clone() for p in params]
        masks = [m.view_as(p) for m, p in zip(self.frozen.split([p.numel() for p in params]), params)]

        def freeze() -> None:
            with torch.no_grad():
                for p, start, mask in zip(params, starts, masks):
                    p.copy_(torch.where(mask, start, p))

        return freeze

    def state_dict(self) -> dict:
        return {} if self.previous_global is None else {"previous_global": self.previous_global.cpu(),
                                                          "frozen": self.frozen}

    def load_state_dict(self, state: dict) -> None:
        if "previous_global" in state:
            device = self.env.device if self.env is not None else "cpu"
            self.previous_global = state["previous_global"].to(device)
            self.frozen = state["frozen"].to(device) if state.get("frozen") is not None else None
