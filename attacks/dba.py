"""DBA, distributed backdoor attack (Xie et al., ICLR 2020)."""

from __future__ import annotations

from torch import Tensor

from attacks.base import ATTACKS, BackdoorAttack

# CIFAR (32x32) layout of the paper: four 1x6 strips, (row, first column).
DBA_STRIPS_32 = ((0, 0), (0, 9), (4, 0), (4, 9))
DBA_STRIP_LENGTH_32 = 6


@ATTACKS.register("dba")
class DBA(BackdoorAttack):
    """The global trigger is split into 4 local parts; each malicious client stamps some
    of them (see :meth:`BackdoorAttack.parts_of`: attacker rank i, 0-based in id order,
    gets part ``i mod 4`` when there are at least 4 attackers, else every part j with
    ``j mod A = i`` for A attackers, so every part is trained by some attacker);
    evaluation uses the union of all parts.

    Parts at 32x32 (the paper's CIFAR setting): 1x6 strips at (row 0, columns 0-5),
    (row 0, columns 9-14), (row 4, columns 0-5), (row 4, columns 9-14). For another
    image size S every row, column and length is scaled by S/32 and rounded.

    Args:
        value: raw pixel value in [0, 1] of the strips, on every channel (1 = white).
        **kwargs: BackdoorAttack arguments (poison_ratio, target_label, malicious_fraction, ...).
    """

    num_parts = 4

    def __init__(self, value: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.value = value

    def problems(self) -> list[tuple[str, object, str]]:
        found = super().problems()
        if not 0.0 <= self.value <= 1.0:
            found.append(("attack.value", self.value, "a raw pixel value in [0, 1]"))
        return found

    @staticmethod
    def strips(image_size: int) -> list[tuple[int, int, int]]:
        """(row, first column, length) of each part for this image size."""
        scale = image_size / 32
        length = max(1, round(DBA_STRIP_LENGTH_32 * scale))
        return [(round(r * scale), round(c * scale), length) for r, c in DBA_STRIPS_32]

    def build_trigger(self, parts: tuple[int, ...] | None) -> tuple[Tensor, Tensor]:
        alpha, raw = self._blank()
        chosen = range(self.num_parts) if parts is None else parts
        for index in chosen:
            row, col, length = self.strips(alpha.shape[-1])[index]
            alpha[:, row, col : col + length] = 1.0
            raw[:, row, col : col + length] = self.value
        return alpha, self._raw_to_input(raw) * alpha
