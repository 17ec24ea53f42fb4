"""Label flipping: malicious clients train on every sample with its label reversed."""

from __future__ import annotations

from torch import Tensor

from attacks.base import ATTACKS, Attack, BatchPoisoning, ClientInfo


class FlippedLabels(BatchPoisoning):
    """``y -> C - 1 - y`` for every sample of every batch; images untouched."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes

    def apply(self, images: Tensor, labels: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        return images, self.num_classes - 1 - labels


@ATTACKS.register("label_flip")
class LabelFlip(Attack):
    """Data poisoning without a trigger (Biggio et al. 2012; Fang et al., USENIX Security
    2020): an attacking client trains on all of its samples with label y replaced by
    ``C - 1 - y`` (C classes) and sends the resulting update. Untargeted: ASR is not
    measured; the damage shows in clean accuracy.

    Args:
        **kwargs: the base Attack's arguments (malicious_fraction, selection, schedule, scale).
    """

    def poison_plan(self, client: ClientInfo, num_samples: int) -> FlippedLabels | None:
        if not client.attacking:
            return None
        assert self.env is not None, "setup() first"
        return FlippedLabels(self.env.num_classes)
