"""Local training of one client: an explicit SGD loop over on-device batches.

Lightning Fabric owns the device and the precision: ``fabric.autocast()`` around the
forward pass, ``fabric.backward()`` for the loss, and the optimizer goes through
``fabric.setup_optimizers``. The model is not wrapped by a distributed strategy: clients
are independent, so no gradient may be synchronised between processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from attacks.base import BatchPoisoning, ClientInfo
from fedbench.data import Augmentation, ImagePipeline, ImageSet
from fedbench.errors import Problem, Problems, config_error
from fedbench.matmul_conv import CONVOLUTIONS

if TYPE_CHECKING:
    from defenses.base import ClientHook


# torch.compile's modes that keep a run reproducible (the max-autotune ones pick kernels by timing)
COMPILE_MODES = ("default", "reduce-overhead")


@dataclass
class LocalTrainConfig:
    """The clients' optimizer and local work (published: SGD lr 0.01, momentum 0.9,
    weight decay 1e-5, batch 64, 10 local epochs).

    Args:
        lr: SGD learning rate.
        momentum: SGD momentum (the optimizer state starts fresh every round).
        weight_decay: SGD weight decay.
        batch_size: local batch size.
        local_epochs: passes over the client's data per round.
        local_steps: if set, exactly this many optimizer steps per round instead of epochs.
        drop_last: drop an incomplete last batch, as the published code does (a client
            with fewer samples than one batch still trains on all it has).
        channels_last: NHWC memory format for conv models (same numbers every run; faster on CPU).
        cohort: train a round's clients together, one vmapped step over all of them
            (``fedbench.cohort``; equal to sequential training up to float rounding):
            true, false, or auto (default): the cohort where it is the faster way, on a GPU
            (measured on an H100: 2.8x the samples/s of sequential training for simple_cnn,
            1.6x for ResNet-18), and where it is needed (``compile`` set, cells packed in
            one process); sequential training on a CPU, where the loop is faster, and for
            what the cohort cannot train: a model with random layers (Dropout) or
            BatchNorm(momentum=None), 16-mixed precision (:func:`fedbench.cohort.trains_as_cohort`).
        compile: compile the cohort's step (its batches' gather, and its
            loss, gradient and SGD update: ``fedbench.fused_step``) with ``torch.compile``
            in this mode: one of ``COMPILE_MODES`` (``reduce-overhead`` adds CUDA graphs on
            a GPU), or None (off).
            Inductor fuses the elementwise kernels; each distinct batch shape compiles once
            per process (seconds to a minute; a C++ compiler on CPU). Equal to the
            uncompiled cohort up to float rounding. The round's evaluation compiles too
            (``fedbench.evaluation.evaluate_compiled``: one graph per batch; its logits too up to float rounding).
        cohort_convolution: how the cohort computes a convolution with each client's own
            weights: ``grouped`` (default; vmap's own rule, one grouped convolution with a
            group per client) or ``matmul`` (a batched matrix product over each image's
            unfolded patches, ``fedbench.matmul_conv``; equal up to float rounding, and on
            a GPU full float32 where cuDNN's convolutions use TF32 by default; more
            memory), or ``triton`` (one Triton kernel launch for every client's convolution,
            forward and backward, ``fedbench.client_conv``: full float32 sums in a fixed
            order; a CUDA device, or on a CPU Triton's interpreter under TRITON_INTERPRET=1,
            for checking only). Used where a cohort trains, and in the Fisher passes of a
            cohort's SDFC and FDCR hooks (``fedbench.fisher.cohort_passes``); not measured
            faster anywhere yet, see ``benchmarks/perf/kernels.py``.
    """

    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-5
    batch_size: int = 64
    local_epochs: int = 10
    local_steps: int | None = None
    drop_last: bool = True
    channels_last: bool = True
    cohort: bool | Literal["auto"] = "auto"
    compile: str | None = None
    cohort_convolution: Literal["grouped", "matmul", "triton"] = "grouped"

    def problems(self) -> list[Problem]:
        found = Problems()
        found.need(self.lr > 0, "train.lr", self.lr, "a learning rate > 0")
        found.need(0 <= self.momentum < 1, "train.momentum", self.momentum, "a value in [0, 1)")
        found.need(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "a value >= 0")
        found.need(self.batch_size >= 1, "train.batch_size", self.batch_size, "an integer >= 1")
        found.need(self.local_epochs >= 1, "train.local_epochs", self.local_epochs, "an integer >= 1")
        found.need(self.local_steps is None or self.local_steps >= 1, "train.local_steps", self.local_steps,
                   "None (use local_epochs) or an integer >= 1")
        found.need(self.compile is None or self.compile in COMPILE_MODES, "train.compile", self.compile,
                   f"None or one of: {', '.join(COMPILE_MODES)}")
        found.need(self.cohort in (True, False, "auto"), "train.cohort", self.cohort, "true, false or auto")
        found.need(self.compile is None or self.cohort is not False, "train.compile", self.compile,
                   "None when train.cohort=false (it compiles the cohort's step)")
        found.need(self.cohort_convolution in CONVOLUTIONS, "train.cohort_convolution", self.cohort_convolution,
                   f"one of: {', '.join(CONVOLUTIONS)}")
        found.need(self.cohort_convolution == "grouped" or self.cohort is not False, "train.cohort_convolution",
                   self.cohort_convolution, "grouped when train.cohort=false (only a cohort computes it otherwise)")
        return found

    def check_device(self, device: torch.device) -> None:
        """One message, before any data is loaded, where ``cohort_convolution`` cannot run on
        ``device``."""
        if self.cohort_convolution == "triton":
            from fedbench.client_conv import unavailable

            why = unavailable(device)
            if why is not None:
                raise config_error("train.cohort_convolution", self.cohort_convolution, why)


def batches_per_epoch(num_samples: int, batch_size: int, drop_last: bool) -> int:
    if drop_last and num_samples >= batch_size:
        return num_samples // batch_size
    return -(-num_samples // batch_size)


@dataclass
class RawBatch:
    """One client batch before the pipeline: the stored samples, their labels, their indices
    in the client's data, and the pipeline's random draws for them (made when the batch is
    taken, in the order the pipeline has always made them)."""

    images: Tensor
    labels: Tensor
    index: Tensor
    draws: Augmentation | None


def raw_batches(
    data: ImageSet,
    pipeline: ImagePipeline,
    batch_size: int,
    generator: torch.Generator | None,
    *,
    train: bool = True,
    shuffle: bool = True,
    drop_last: bool = True,
    chunk: int = 1,
) -> Iterator[RawBatch]:
    """One epoch of batches, ``chunk`` batches at a time as one RawBatch (their samples in
    order). Its sample order and its augmentation draws are made at its start
    (:func:`epoch_order`), so a client's batches are the same whether they are finished
    one by one, several at a time, together with other clients', or gathered for a whole
    cohort."""
    order, draws, sizes = epoch_order(len(data), pipeline, batch_size, generator, data.labels.device,
                                      train=train, shuffle=shuffle, drop_last=drop_last)
    start = 0
    for first in range(0, len(sizes), chunk):
        stop = start + sum(sizes[first:first + chunk])
        index = order[start:stop]
        yield RawBatch(data.images[index], data.labels[index], index,
                       draws.slice(start, stop) if draws is not None else None)
        start = stop


def epoch_order(n: int, pipeline: ImagePipeline, batch_size: int, generator: torch.Generator | None,
                device: torch.device, *, train: bool = True, shuffle: bool = True,
                drop_last: bool = True) -> tuple[Tensor, Augmentation | None, list[int]]:
    """One epoch of ``n`` samples: the sample order (a permutation from ``generator``, or
    0..n-1), then the augmentation draws of every batch (``train``), and the batch sizes."""
    order = torch.randperm(n, generator=generator, device=device) if shuffle else torch.arange(n, device=device)
    count = batches_per_epoch(n, batch_size, drop_last)
    sizes = [min(batch_size, n - b * batch_size) for b in range(count)]
    draws = pipeline.draw_epoch(sizes, device, generator) if train else None
    return order, draws, sizes


def iterate_batches(data: ImageSet, pipeline: ImagePipeline, batch_size: int, generator: torch.Generator | None,
                    *, poison: BatchPoisoning | None = None, chunk: int = 1,
                    **epoch: bool) -> Iterator[tuple[Tensor, Tensor]]:
    """One epoch of model-ready ``(inputs, labels)`` batches, built on the data's device
    (``epoch``: :func:`raw_batches`'s ``train``, ``shuffle`` and ``drop_last``).

    ``chunk`` batches are built at a time (one gather, one pipeline pass, one poisoning)
    and handed out one by one: on a GPU a batch then costs a few launches per chunk, not
    a dozen per batch. The batches are the same bit for bit whatever ``chunk`` (every
    step of the pipeline and of a poisoning is per sample; only an epoch's last batch
    can be short)."""
    for raw in raw_batches(data, pipeline, batch_size, generator, chunk=chunk, **epoch):
        inputs, labels = finished(pipeline, raw, poison)
        yield from zip(inputs.split(batch_size), labels.split(batch_size))


def finished(pipeline: ImagePipeline, raw: RawBatch, poison: BatchPoisoning | None) -> tuple[Tensor, Tensor]:
    """A raw batch through the pipeline, then the client's poisoning."""
    inputs, labels = pipeline.apply(raw.images, raw.draws), raw.labels
    if poison is not None:
        inputs, labels = poison.apply(inputs, labels, raw.index)
    return inputs, labels


@dataclass
class ClientJob:
    """One client's local training as prepared by the engine (hooks run, model loaded)."""

    client: ClientInfo
    model: nn.Module
    data: ImageSet
    generator: torch.Generator
    plan: BatchPoisoning | None
    protocol: "ClientHook | None"
    batches: tuple
    regularizer: Callable[[], Tensor] | None
    after_step: Callable[[], None] | None
    time_hook: float
    max_steps: int | None = None  # train exactly this many steps over endless epochs (the server's training)

    def step_limit(self, config: LocalTrainConfig) -> int | None:
        """The steps this job trains at most: its own ``max_steps``, else ``local_steps``
        (None: its ``local_epochs``), as :meth:`LocalTrainer.train` counts them."""
        return self.max_steps if self.max_steps is not None else config.local_steps


@dataclass
class LocalResult:
    steps: int
    mean_loss: float


class LocalTrainer:
    """Trains the one shared model instance in place; the caller loads the start
    parameters before and reads the trained ones after."""

    def __init__(self, model: nn.Module, config: LocalTrainConfig, pipeline: ImagePipeline, fabric) -> None:
        self.model = model
        self.config = config
        self.pipeline = pipeline
        self.fabric = fabric

    def epochs(
        self, data: ImageSet, generator: torch.Generator, poison: BatchPoisoning | None, endless: bool
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """``local_epochs`` epochs of batches, or endless ones when training by steps."""
        for raw in self.raw_epochs(data, generator, endless):
            yield finished(self.pipeline, raw, poison)

    def raw_epochs(self, data: ImageSet, generator: torch.Generator, endless: bool) -> Iterator[RawBatch]:
        """The batches of :meth:`epochs` before the pipeline and the poisoning (the cohort
        finishes several clients' batches in one pass)."""
        epoch = 0
        while endless or epoch < self.config.local_epochs:
            yield from raw_batches(data, self.pipeline, self.config.batch_size, generator,
                                   drop_last=self.config.drop_last)
            epoch += 1

    def prepare(self, inputs: Tensor) -> Tensor:
        if self.config.channels_last:
            return inputs.contiguous(memory_format=torch.channels_last)
        return inputs

    def train(
        self,
        data: ImageSet,
        generator: torch.Generator,
        poison: BatchPoisoning | None = None,
        regularizer: Callable[[], Tensor] | None = None,
        max_steps: int | None = None,
        after_step: Callable[[], None] | None = None,
    ) -> LocalResult:
        """Local SGD from the loaded model. ``regularizer()`` is added to every step's loss;
        ``after_step()`` runs after every optimizer step (e.g. an attack's projection)."""
        model, config = self.model, self.config
        # foreach: one kernel per SGD operation over all tensors (a GPU's default; on a CPU
        # the same per-tensor arithmetic, bit for bit)
        optimizer = torch.optim.SGD(
            model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
            foreach=True,
        )
        optimizer = self.fabric.setup_optimizers(optimizer)
        limit = max_steps if max_steps is not None else config.local_steps
        model.train()
        steps = 0
        loss_sum = torch.zeros((), device=self.fabric.device)
        for inputs, labels in self.epochs(data, generator, poison, endless=limit is not None):
            with self.fabric.autocast():
                loss = F.cross_entropy(model(self.prepare(inputs)), labels)
            if regularizer is not None:
                loss = loss + regularizer()
            optimizer.zero_grad(set_to_none=True)
            self.fabric.backward(loss)
            optimizer.step()
            if after_step is not None:
                after_step()
            loss_sum += loss.detach()
            steps += 1
            if limit is not None and steps >= limit:
                break
        return LocalResult(steps, float(loss_sum) / max(steps, 1))
