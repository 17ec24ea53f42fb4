"""Gaussian noise in place of an update."""

from __future__ import annotations

import torch
from torch import Tensor

from attacks.base import ATTACKS, Attack, ServerView


@ATTACKS.register("gaussian")
class GaussianNoise(Attack):
    """Every attacking client sends an independent draw from ``N(0, sigma^2 I)`` instead
    of an update (the "Gaussian" Byzantine attack of Blanchard et al., NeurIPS 2017 and
    of ByzFL/Blades/FLPoison). Drawn on the server side from the attack's own seeded
    stream, so one and N processes send the same noise. Untargeted: ASR is not measured.

    Args:
        sigma: standard deviation per coordinate (default 1.0).
        **kwargs: the base Attack's arguments (malicious_fraction, selection, schedule).
    """

    def __init__(self, sigma: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.sigma = sigma

    def problems(self) -> list[tuple[str, object, str]]:
        found = super().problems()
        if not self.sigma > 0:
            found.append(("attack.sigma", self.sigma, "a standard deviation > 0"))
        return found

    def craft_round(self, view: ServerView) -> Tensor:
        shape = (int(view.own.sum()), view.updates.shape[1])
        noise = torch.randn(shape, generator=view.generator, device=view.updates.device, dtype=view.updates.dtype)
        return self.sigma * noise
