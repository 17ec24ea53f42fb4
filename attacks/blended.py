"""Blended (Chen et al., 2017): the whole image mixed with a fixed pattern."""

from __future__ import annotations

import torch
from torch import Tensor

from attacks.base import ATTACKS, BackdoorAttack


@ATTACKS.register("blended")
class Blended(BackdoorAttack):
    """``x' = (1 - alpha) * x + alpha * pattern`` over every pixel and channel, at training
    and at test time. The pattern is uniform noise in [0, 1] drawn from ``pattern_seed``
    (fixed across runs and seeds, no download), or an image file resized to the input.

    Args:
        alpha: blend ratio (0.2 at training and test, as in BackdoorBench).
        pattern_seed: seed of the noise pattern.
        pattern_path: an image file (PNG/JPEG) to blend instead of noise.
        **kwargs: BackdoorAttack arguments (poison_ratio, target_label, malicious_fraction, ...).
    """

    def __init__(self, alpha: float = 0.2, pattern_seed: int = 0, pattern_path: str | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.alpha = alpha
        self.pattern_seed = pattern_seed
        self.pattern_path = pattern_path

    def problems(self) -> list[tuple[str, object, str]]:
        found = super().problems()
        if not 0.0 < self.alpha <= 1.0:
            found.append(("attack.alpha", self.alpha, "a blend ratio in (0, 1]"))
        if self.pattern_path is not None:
            import os

            if not os.path.isfile(self.pattern_path):
                found.append(("attack.pattern_path", self.pattern_path, "an existing image file, or None for noise"))
        return found

    def raw_pattern(self, channels: int, size: int) -> Tensor:
        if self.pattern_path is None:
            generator = torch.Generator().manual_seed(self.pattern_seed)
            return torch.rand((channels, size, size), generator=generator)
        from torchvision.io import ImageReadMode, read_image

        image = read_image(self.pattern_path, ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY)
        image = torch.nn.functional.interpolate(
            image.unsqueeze(0).float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
        return (image.squeeze(0) / 255.0).clamp(0, 1)

    def build_trigger(self, parts: tuple[int, ...] | None) -> tuple[Tensor, Tensor]:
        alpha, _ = self._blank()
        alpha.fill_(self.alpha)
        pattern = self._raw_to_input(self.raw_pattern(alpha.shape[0], alpha.shape[-1]))
        return alpha, pattern
