"""The SDFC/FDCR papers' trigger, as their published code sets it."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from attacks.base import ATTACKS, BackdoorAttack

# (row, col) of the 2x6 pattern: rows 0 and 2, columns 0-2 and 4-6.
PIXEL_PATTERN = tuple((row, col) for row in (0, 2) for col in (0, 1, 2, 4, 5, 6))


@ATTACKS.register("pixel_pattern")
class PixelPattern(BackdoorAttack):
    """12 pixels in the top-left corner: rows 0 and 2, columns 0-2 and 4-6.

    Default = the published code: after normalisation, channel 0 of those pixels is set
    to 1.0 (``value_space="normalized"``). On Fashion-MNIST (mean 0.1307, std 0.3081)
    that is a raw value of 0.439 in the red channel only, channels 1 and 2 untouched.
    ``value_space="raw"`` sets raw pixel values instead (e.g. value 1.0 = white), and
    ``channels="all"`` stamps every channel.

    Args:
        channels: channel indices to stamp, or "all".
        value: the value written, in ``value_space``.
        value_space: "normalized" (model-input space, the published code) or "raw" ([0, 1] pixels).
        **kwargs: BackdoorAttack arguments (poison_ratio, target_label, malicious_fraction, ...).
    """

    def __init__(
        self,
        channels: list[int] | Literal["all"] = [0],  # noqa: B006 - jsonargparse shows the default
        value: float = 1.0,
        value_space: Literal["normalized", "raw"] = "normalized",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.channels = channels
        self.value = value
        self.value_space = value_space

    def problems(self) -> list[tuple[str, object, str]]:
        found = super().problems()
        if self.value_space not in ("normalized", "raw"):
            found.append(("attack.value_space", self.value_space, "one of: normalized, raw"))
        if self.value_space == "raw" and not 0.0 <= self.value <= 1.0:
            found.append(("attack.value", self.value, "a raw pixel value in [0, 1] when value_space is raw"))
        if self.channels != "all" and (not self.channels or any(c < 0 for c in self.channels)):
            found.append(("attack.channels", self.channels, '"all" or a non-empty list of channel indices'))
        return found

    def build_trigger(self, parts: tuple[int, ...] | None) -> tuple[Tensor, Tensor]:
        alpha, values = self._blank()
        num_channels = alpha.shape[0]
        channels = list(range(num_channels)) if self.channels == "all" else list(self.channels)
        if max(channels) >= num_channels:
            from fedbench.errors import config_error

            raise config_error("attack.channels", self.channels, f"channel indices below {num_channels}")
        for row, col in PIXEL_PATTERN:
            alpha[channels, row, col] = 1.0
            values[channels, row, col] = self.value
        pattern = values if self.value_space == "normalized" else self._raw_to_input(values)
        return alpha, pattern * alpha
