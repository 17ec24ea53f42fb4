"""Clean accuracy, test loss and attack success rate of the global model, in large batches."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics import MeanMetric, SumMetric
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from attacks.base import Attack, BackdoorAttack
from fedbench.data import ImagePipeline, ImageSet


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    test: ImageSet,
    pipeline: ImagePipeline,
    attack: Attack,
    num_classes: int,
    batch_size: int = 1024,
    autocast=None,
    channels_last: bool = False,
) -> dict[str, float | None]:
    """``clean_acc``, ``asr`` and ``asr_all`` in percent, ``clean_loss`` the mean cross-entropy.

    Every test image is triggered; ``asr`` is the share predicted as the target among
    images whose true label is not the target (the headline), ``asr_all`` the share among
    all test images (the published SDFC/FDCR count). Both None for attacks without a trigger.
    """
    device = test.labels.device
    # Only one process evaluates the global model, so the metrics must not sync across
    # processes; nor with the host per batch (input checks, NaN filtering, boolean masks:
    # each a wait for the GPU), so that a GPU runs the batches back to back. A NaN loss
    # stays NaN (a model that gives one says so).
    local = {"sync_on_compute": False}
    accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro", validate_args=False, **local).to(device)
    loss = MeanMetric(nan_strategy="disable", **local).to(device)
    asr_all = MeanMetric(nan_strategy="disable", **local).to(device)
    # ASR over non-target images as two sums, not boolean indexing (a host sync) nor a
    # weighted MeanMetric (torchmetrics 1.9 drops the weights under nan_strategy="disable")
    non_target_hits = SumMetric(nan_strategy="disable", **local).to(device)
    non_target_images = SumMetric(nan_strategy="disable", **local).to(device)
    backdoor = attack if isinstance(attack, BackdoorAttack) else None
    was_training = model.training
    model.eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for start in range(0, len(test), batch_size):
        images = test.images[start : start + batch_size]
        labels = test.labels[start : start + batch_size]
        inputs = pipeline(images, train=False)
        with autocast() if autocast else torch.autocast(device.type, enabled=False):
            logits = model(inputs.contiguous(memory_format=memory_format)).float()
        accuracy.update(logits, labels)
        loss.update(F.cross_entropy(logits, labels, reduction="none"))
        if backdoor is not None:
            triggered = backdoor.apply_trigger(inputs)
            with autocast() if autocast else torch.autocast(device.type, enabled=False):
                predicted = model(triggered.contiguous(memory_format=memory_format)).argmax(dim=1)
            hit = (predicted == backdoor.target_label).float()
            asr_all.update(hit)
            non_target = (labels != backdoor.target_label).float()
            non_target_hits.update(hit * non_target)
            non_target_images.update(non_target)
    model.train(was_training)
    counted = float(non_target_images.compute()) if backdoor is not None else 0.0  # 0: target-class images only
    return {
        "clean_acc": 100.0 * float(accuracy.compute()),
        "clean_loss": float(loss.compute()),
        "asr": 100.0 * float(non_target_hits.compute()) / counted if counted > 0 else None,
        "asr_all": 100.0 * float(asr_all.compute()) if backdoor is not None else None,
    }


@torch.inference_mode()
def predict_labels(
    model: nn.Module,
    images: Tensor,
    pipeline: ImagePipeline,
    attack: Attack,
    batch_size: int = 1024,
    autocast=None,
    channels_last: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """The model's predicted labels on ``images`` (raw test images), and on the same images
    with the attack's trigger (None for attacks without one), in large batches."""
    backdoor = attack if isinstance(attack, BackdoorAttack) else None
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    was_training = model.training
    model.eval()

    def labels_of(inputs: Tensor) -> Tensor:
        with autocast() if autocast else torch.autocast(inputs.device.type, enabled=False):
            return model(inputs.contiguous(memory_format=memory_format)).argmax(dim=1)

    clean, triggered = [], []
    for start in range(0, len(images), batch_size):
        inputs = pipeline(images[start : start + batch_size], train=False)
        clean.append(labels_of(inputs))
        if backdoor is not None:
            triggered.append(labels_of(backdoor.apply_trigger(inputs)))
    model.train(was_training)
    return torch.cat(clean), (torch.cat(triggered) if backdoor is not None else None)
