"""Clean accuracy, test loss and attack success rate of the global model, in large batches."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics import MeanMetric, SumMetric
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from attacks.base import Attack, BackdoorAttack, blend
from fedbench.data import ImagePipeline, ImageSet


def evaluate(
    model: nn.Module,
    test: ImageSet,
    pipeline: ImagePipeline,
    attack: Attack,
    num_classes: int,
    batch_size: int = 1024,
    autocast=None,
    channels_last: bool = False,
    compile_mode: str | None = None,
) -> dict[str, float | None]:
    """``clean_acc``, ``asr`` and ``asr_all`` in percent, ``clean_loss`` the mean cross-entropy.

    Every test image is triggered; ``asr`` is the share predicted as the target among
    images whose true label is not the target (the headline), ``asr_all`` the share among
    all test images (the published SDFC/FDCR count). Both None for attacks without a trigger.
    ``compile_mode`` (``train.compile``): each batch's counts in one compiled graph
    (:func:`evaluate_compiled`) instead of torchmetrics' updates, for attacks whose trigger
    is :class:`~attacks.base.BackdoorAttack`'s blend (one that applies its own stays here).
    """
    blend = isinstance(attack, BackdoorAttack) and type(attack).apply_trigger is BackdoorAttack.apply_trigger
    if compile_mode is not None and len(test) > 0 and (blend or not isinstance(attack, BackdoorAttack)):
        return evaluate_compiled(model, test, pipeline, attack, batch_size, autocast, channels_last, compile_mode)
    return evaluate_with_torchmetrics(model, test, pipeline, attack, num_classes, batch_size, autocast, channels_last)


@torch.inference_mode()
def evaluate_with_torchmetrics(model: nn.Module, test: ImageSet, pipeline: ImagePipeline, attack: Attack,
                               num_classes: int, batch_size: int, autocast,
                               channels_last: bool) -> dict[str, float | None]:
    """:func:`evaluate` batch by batch, the metrics in torchmetrics."""
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


COUNTS = ("correct", "loss", "images", "hits", "non_target_hits", "non_target_images")


def batch_counts(model: nn.Module, images: Tensor, labels: Tensor, valid: Tensor, pipeline: ImagePipeline,
                 trigger: tuple[Tensor, Tensor, Tensor] | None, memory_format: torch.memory_format) -> Tensor:
    """One batch's sums, float64, in the order of :data:`COUNTS`: correct predictions, the
    cross-entropy's sum, images; with a trigger ``(alpha, pattern, target)``, the triggered
    images predicted as the target, those among non-target images, and non-target images.
    Rows where ``valid`` is False (padding) count nowhere."""
    inputs = pipeline(images, train=False)
    logits = model(inputs.contiguous(memory_format=memory_format)).float()
    correct = (logits.argmax(dim=1) == labels) & valid
    loss = torch.where(valid, F.cross_entropy(logits, labels, reduction="none"), 0.0)
    counts = [correct.sum(), loss.sum(), valid.sum()]
    if trigger is not None:
        alpha, pattern, target = trigger
        triggered = blend(inputs, alpha, pattern)
        hit = (model(triggered.contiguous(memory_format=memory_format)).argmax(dim=1) == target) & valid
        non_target = (labels != target) & valid
        counts += [hit.sum(), (hit & non_target).sum(), non_target.sum()]
    return torch.stack([count.double() for count in counts])


@torch.no_grad()  # not inference mode: its tensors (the padded last batch) would compile a second graph
def evaluate_compiled(model: nn.Module, test: ImageSet, pipeline: ImagePipeline, attack: Attack, batch_size: int,
                      autocast, channels_last: bool, mode: str) -> dict[str, float | None]:
    """:func:`evaluate`'s numbers with each batch's counts in one compiled graph
    (:func:`batch_counts`, ``torch.compile`` in ``mode``): a shorter last batch is padded
    to the full batch size (its padding counts nowhere), so one graph serves every batch.
    Counts are exact (float64 sums of integers); the loss's sum is float64 over float32
    per-image losses, where torchmetrics sums in float32: ``clean_loss`` may differ from
    the uncompiled path in its last digits."""
    from fedbench.compiling import compiled_once, step_begins

    counts_of = compiled_once(batch_counts, mode)  # a graph per model architecture and batch shape, kept
    device = test.labels.device
    backdoor = attack if isinstance(attack, BackdoorAttack) else None
    trigger = None
    if backdoor is not None:
        trigger = (*backdoor.trigger(None), torch.tensor(backdoor.target_label, device=device))
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    size = min(batch_size, len(test))
    everything = torch.ones(size, dtype=torch.bool, device=device)
    totals = torch.zeros(len(COUNTS), dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    for start in range(0, len(test), size):
        images, labels = test.images[start:start + size], test.labels[start:start + size]
        valid = everything
        if len(labels) < size:  # the last batch, padded: one graph for every batch
            valid = torch.arange(size, device=device) < len(labels)
            images = torch.cat([images, images.new_zeros((size - len(labels), *images.shape[1:]))])
            labels = torch.cat([labels, labels.new_zeros(size - len(labels))])
        step_begins(mode)  # the counts are added to the totals before the next batch
        with autocast() if autocast else torch.autocast(device.type, enabled=False):
            counts = counts_of(model, images, labels, valid, pipeline, trigger, memory_format)
        totals[:len(counts)] += counts
    model.train(was_training)
    return results_from(dict(zip(COUNTS, totals.tolist())), backdoor is not None)


def results_from(totals: dict[str, float], triggered: bool) -> dict[str, float | None]:
    """:func:`evaluate`'s results from :func:`batch_counts`' sums over the test set."""
    images, non_target = totals["images"], totals["non_target_images"]
    return {
        "clean_acc": 100.0 * totals["correct"] / images,
        "clean_loss": totals["loss"] / images,
        "asr": 100.0 * totals["non_target_hits"] / non_target if triggered and non_target > 0 else None,
        "asr_all": 100.0 * totals["hits"] / images if triggered else None,
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
