"""A backdoor kept within an L2 ball around the global model, to slip under norm clipping
(Sun et al. 2019, "Can you really backdoor federated learning?"; Wang et al., NeurIPS
2020, "Attack of the Tails": projected gradient descent)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from attacks.base import ATTACKS, BorrowedTriggerBackdoor, ClientInfo
from fedbench.params import trainable_parameters


@ATTACKS.register("norm_bounded")
class NormBounded(BorrowedTriggerBackdoor):
    """A trigger backdoor trained by projected gradient descent: after every optimizer step
    the local model w is projected onto ``||w - w_global||_2 <= radius`` (Wang et al.'s
    PGD; they project every few steps, we after every step). ``radius`` given, or (None,
    default) estimated by the attacker on its own device as the L2 norm of the update it
    would send if it trained honestly on its clean data this round (one extra local
    training per attacking client and round): a benign client's norm, which is what a
    median-norm clipping threshold tracks. No other client's update is known.

    Args:
        radius: the L2 bound of the update, or None for the attacker's own clean-update norm.
        trigger: the registered backdoor whose trigger is stamped (default pixel_pattern).
        **kwargs: BackdoorAttack arguments (poison_ratio, target_label, malicious_fraction, ...).
    """

    def __init__(self, radius: float | None = None, trigger: str = "pixel_pattern", **kwargs) -> None:
        super().__init__(trigger=trigger, **kwargs)
        self.radius = radius
        self.last_radius: dict[int, float] = {}

    def problems(self) -> list[tuple[str, object, str]]:
        found = super().problems()
        if self.radius is not None and not self.radius > 0:
            found.append(("attack.radius", self.radius, "None (the attacker's clean-update norm) or a number > 0"))
        return found

    def step_hook(self, client: ClientInfo, model: nn.Module) -> Callable[[], None]:
        radius = self.radius
        if radius is None:
            assert self.env is not None and self.env.clean_update is not None, "the engine offers clean_update"
            radius = float(torch.linalg.vector_norm(self.env.clean_update(client)))
        self.last_radius[client.client_id] = radius
        params = trainable_parameters(model)
        starts = [p.detach().clone() for p in params]

        def project() -> None:
            with torch.no_grad():
                norm = torch.sqrt(sum(((p - s) ** 2).sum() for p, s in zip(params, starts)))
                if norm > radius:
                    for p, s in zip(params, starts):
                        p.copy_(s + (p - s) * (radius / norm))

        return project
