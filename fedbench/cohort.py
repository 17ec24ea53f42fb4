"""Several clients' local training as one cohort: one forward and backward pass per step
over every client's batch (``torch.func.functional_call`` under ``vmap``), one optimizer
step over every client's parameters.

What stays each client's own: its copy of the model (so every client hook sees a normal
module), its data order, augmentation and poisoning (its own seeded batch stream, drawn
in the same order as sequential training), its extra loss terms and after-step hooks,
its SGD momentum, and its number of steps: a client whose epochs (or ``local_steps``)
are done drops out of the cohort and stops moving. Clients whose batch of this step has
another shape (a client smaller than one batch) are stepped in a cohort of their own.

The numbers equal sequential training up to float rounding (vmapped kernels sum in
another order; in float64 they agree to 1e-15). On a GPU the point is fewer, larger
kernels: a round of K clients of the papers' 90k-parameter CNN on batches of 64 is
kernel-launch bound sequentially. ``channels_last`` has no effect inside the cohort (on CUDA
vmap needs contiguous tensors there).

Limits: models with random layers (Dropout) or ``BatchNorm(momentum=None)`` cannot be
vmapped (a clear error says so); ``16-mixed`` precision is refused (one loss scaler for
all clients would skip every client's step when one overflows). Every client's
before-training hooks run before any client trains: hooks keep their state per client.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, vmap

from fedbench.client import ClientJob, LocalResult, LocalTrainer
from fedbench.errors import FedbenchError


class CohortTrainer:
    """Trains the jobs' models together with the sequential trainer's configuration."""

    def __init__(self, trainer: LocalTrainer) -> None:
        self.trainer = trainer
        self.template = trainer.model

    def train(self, jobs: list[ClientJob]) -> list[LocalResult]:
        config, fabric = self.trainer.config, self.trainer.fabric
        limit = config.local_steps
        streams = [self.trainer.epochs(job.data, job.generator, job.plan, endless=limit is not None) for job in jobs]
        params = [p for job in jobs for p in job.model.parameters()]
        # foreach, as the sequential trainer: one kernel per SGD operation for every client's tensors
        optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                                    weight_decay=config.weight_decay, foreach=True)
        optimizer = fabric.setup_optimizers(optimizer)
        self.template.train()  # functional_call runs the template's modules: their mode counts
        for job in jobs:
            job.model.train()
        steps = [0] * len(jobs)
        loss_sums = [torch.zeros((), device=fabric.device) for _ in jobs]
        active = list(range(len(jobs)))
        while active:
            batches = next_batches(streams, active)
            if not batches:
                break
            losses = self.step(jobs, batches, optimizer)
            for k, loss in losses.items():
                if jobs[k].after_step is not None:
                    jobs[k].after_step()
                loss_sums[k] += loss
                steps[k] += 1
            active = [k for k in batches if limit is None or steps[k] < limit]
        return [LocalResult(n, float(total) / max(n, 1)) for n, total in zip(steps, loss_sums)]

    def step(self, jobs: list[ClientJob], batches: dict[int, tuple[Tensor, Tensor]], optimizer) -> dict[int, Tensor]:
        """One optimizer step of every client in ``batches``; returns each one's loss."""
        optimizer.zero_grad(set_to_none=True)  # clients not in this step keep no gradient: SGD skips them
        losses: dict[int, Tensor] = {}
        for group in same_shape_groups(batches):
            for k, loss in zip(group, self.group_losses([jobs[k].model for k in group], [batches[k] for k in group])):
                regularizer = jobs[k].regularizer
                losses[k] = loss + regularizer() if regularizer is not None else loss
        self.trainer.fabric.backward(torch.stack(list(losses.values())).sum())
        optimizer.step()
        return {k: loss.detach() for k, loss in losses.items()}

    def group_losses(self, models: list[nn.Module], batches: list[tuple[Tensor, Tensor]]) -> Tensor:
        """Each model's cross-entropy on its batch, ``[K]``, in one vmapped pass; BatchNorm
        statistics are written back to each model."""
        params = stacked(models, lambda m: m.named_parameters())
        buffers = stacked(models, lambda m: m.named_buffers())
        inputs = vmappable(torch.stack([x for x, _ in batches]))
        labels = torch.stack([y for _, y in batches])

        def loss_of(p: dict[str, Tensor], b: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
            return F.cross_entropy(functional_call(self.template, {**p, **b}, (x,)), y)

        with self.trainer.fabric.autocast():
            try:
                losses = vmap(loss_of)(params, buffers, inputs, labels)
            except RuntimeError as err:
                raise FedbenchError(f"train.cohort=true cannot train this model ({err}); models with random "
                                    "layers (Dropout) or BatchNorm(momentum=None) need train.cohort=false") from err
        with torch.no_grad():  # the running statistics were updated in the stacked copies
            for k, model in enumerate(models):
                for name, buffer in model.named_buffers():
                    buffer.copy_(buffers[name][k])
        return losses


def stacked(models: list[nn.Module], named) -> dict[str, Tensor]:
    """``{name: [K, ...]}`` of the models' parameters (differentiable) or buffers."""
    per_model = [dict(named(m)) for m in models]
    return {name: vmappable(torch.stack([tensors[name] for tensors in per_model])) for name in per_model[0]}


def vmappable(stack: Tensor) -> Tensor:
    """On CUDA, BatchNorm asks a channels_last tensor for its layout, which vmap cannot answer:
    there the stack is made contiguous. On CPU it keeps the sequential trainer's layout, so
    both sum in the same order."""
    return stack.contiguous() if stack.is_cuda else stack


def next_batches(streams: list[Iterator[tuple[Tensor, Tensor]]], active: list[int]) -> dict[int, tuple[Tensor, Tensor]]:
    """The next batch of every active client whose epochs are not done."""
    batches = {}
    for k in active:
        batch = next(streams[k], None)
        if batch is not None:
            batches[k] = batch
    return batches


def same_shape_groups(batches: dict[int, tuple[Tensor, Tensor]]) -> list[list[int]]:
    """Clients grouped by their batch's shape (in client order)."""
    groups: dict[tuple, list[int]] = {}
    for k, (inputs, _) in batches.items():
        groups.setdefault(tuple(inputs.shape), []).append(k)
    return list(groups.values())
