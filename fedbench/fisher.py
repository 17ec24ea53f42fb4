"""Diagonal Fisher information of a model on a data set, two estimators.

``empirical`` (the textbook empirical Fisher):
    ``F_i = (1 / N) * sum_n (d/d theta_i log p(y_n | x_n, theta))^2``
    over every sample of every batch, at the sample's own label. Per-sample gradients
    come from ``torch.func`` (``vmap`` of ``grad`` of a ``functional_call``), batched.
    The model is in eval mode (BatchNorm uses running statistics, so a per-sample
    gradient is well defined).

``published`` (what the public SDFC code computes, ``fish_calculate``):
    ``F_i = ((1 / B) * sum_b d/d theta_i L_b)^2`` where, for batch b,
    ``L_b = mean(log_softmax(f(x))[:, y])``. The code indexes the ``[B, C]`` log-softmax
    with the label vector along the class axis, which gives a ``[B, B]`` matrix: L_b is
    the mean of ``log p(y_j | x_i)`` over all pairs (i, j) of the batch, not only i = j.
    The gradients are averaged over batches first and squared last. The model stays in
    training mode, as in the code.
"""

from __future__ import annotations

from typing import Iterable, Literal

import torch
import torch.nn as nn
from torch import Tensor
from torch.func import functional_call, grad, vmap

FisherEstimator = Literal["empirical", "published"]


def _named_trainable(model: nn.Module) -> dict[str, Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def empirical_fisher(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]]) -> list[Tensor]:
    params = {name: p.detach() for name, p in _named_trainable(model).items()}
    buffers = {name: b.detach() for name, b in model.named_buffers()}

    def log_likelihood(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        logits = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        return torch.log_softmax(logits, dim=1)[0].gather(0, y.unsqueeze(0)).squeeze(0)

    per_sample_grad = vmap(grad(log_likelihood), in_dims=(None, 0, 0))
    totals = [torch.zeros_like(p) for p in params.values()]
    count = 0
    was_training = model.training
    model.eval()
    try:
        for inputs, labels in batches:
            grads = per_sample_grad(params, inputs, labels)
            for total, g in zip(totals, grads.values()):
                total += g.pow(2).sum(dim=0)
            count += len(labels)
    finally:
        model.train(was_training)
    return [t / max(count, 1) for t in totals]


def published_fisher(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]]) -> list[Tensor]:
    params = list(_named_trainable(model).values())
    totals = [torch.zeros_like(p) for p in params]
    num_batches = 0
    for inputs, labels in batches:
        log_probs = torch.log_softmax(model(inputs), dim=1)
        objective = log_probs[:, labels].mean()  # [B, B]: every (sample, label) pair, as published
        grads = torch.autograd.grad(objective, params, allow_unused=True)
        for total, g in zip(totals, grads):
            if g is not None:
                total += g
        num_batches += 1
    return [(t / max(num_batches, 1)).pow(2) for t in totals]


def diagonal_fisher(
    model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], estimator: FisherEstimator = "empirical"
) -> list[Tensor]:
    """Per-parameter-tensor diagonal Fisher, in ``named_parameters()`` order."""
    if estimator == "empirical":
        return empirical_fisher(model, batches)
    if estimator == "published":
        return published_fisher(model, batches)
    raise ValueError(f"fisher estimator must be 'empirical' or 'published', not {estimator!r}")
