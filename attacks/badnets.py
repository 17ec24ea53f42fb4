"""BadNets (Gu et al., 2017): a solid square patch."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from attacks.base import ATTACKS, BackdoorAttack

Corner = Literal["bottom_right", "bottom_left", "top_right", "top_left"]


@ATTACKS.register("badnets")
class BadNets(BackdoorAttack):
    """A ``size x size`` patch of raw pixel value ``value`` on every channel, ``margin``
    pixels from the chosen corner. Default: 3x3 white at the bottom-right corner
    (BackdoorBench's convention).

    Args:
        size: side of the square patch, in pixels.
        position: corner the patch sits in.
        margin: distance of the patch from that corner, in pixels.
        value: raw pixel value in [0, 1] (1 = white).
        **kwargs: BackdoorAttack arguments (poison_ratio, target_label, malicious_fraction, ...).
    """

    def __init__(
        self, size: int = 3, position: Corner = "bottom_right", margin: int = 0, value: float = 1.0, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        self.size = size
        self.position = position
        self.margin = margin
        self.value = value

    def problems(self) -> list[tuple[str, object, str]]:
        found = super().problems()
        if self.size < 1:
            found.append(("attack.size", self.size, "an integer >= 1"))
        if self.margin < 0:
            found.append(("attack.margin", self.margin, "an integer >= 0"))
        if not 0.0 <= self.value <= 1.0:
            found.append(("attack.value", self.value, "a raw pixel value in [0, 1]"))
        return found

    def patch_origin(self, image_size: int) -> tuple[int, int]:
        far = image_size - self.size - self.margin
        row = self.margin if self.position.startswith("top") else far
        col = self.margin if self.position.endswith("left") else far
        return row, col

    def build_trigger(self, parts: tuple[int, ...] | None) -> tuple[Tensor, Tensor]:
        alpha, raw = self._blank()
        size = alpha.shape[-1]
        if self.size + self.margin > size:
            from fedbench.errors import config_error

            raise config_error("attack.size", self.size, f"size + margin <= image size {size}")
        row, col = self.patch_origin(size)
        alpha[:, row : row + self.size, col : col + self.size] = 1.0
        raw[:, row : row + self.size, col : col + self.size] = self.value
        return alpha, self._raw_to_input(raw) * alpha
