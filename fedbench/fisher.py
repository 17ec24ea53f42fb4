"""Diagonal Fisher information of a model on a data set, two estimators.

``empirical`` (the textbook empirical Fisher):
    ``F_i = (1 / N) * sum_n (d/d theta_i log p(y_n | x_n, theta))^2``
    over every sample of every batch, at the sample's own label. For models made of Linear
    and Conv2d layers (simple_cnn) the squared per-sample gradients come layer by layer
    from each layer's input and output gradient; other models (ResNet's BatchNorm) use
    per-sample gradients from ``torch.func`` (``vmap`` of ``grad``). The model is in eval
    mode (BatchNorm uses running statistics, so a per-sample gradient is well defined).

``published`` (what the public SDFC code computes, ``fish_calculate``):
    ``F_i = ((1 / B) * sum_b d/d theta_i L_b)^2`` where, for batch b,
    ``L_b = mean(log_softmax(f(x))[:, y])``. The code indexes the ``[B, C]`` log-softmax
    with the label vector along the class axis, which gives a ``[B, B]`` matrix: L_b is
    the mean of ``log p(y_j | x_i)`` over all pairs (i, j) of the batch, not only i = j.
    The gradients are averaged over batches first and squared last. The model stays in
    training mode, as in the code (BatchNorm normalises with batch statistics).

Neither estimator changes the model: its buffers (BatchNorm running statistics, which a
forward pass in training mode updates) are restored exactly to what they were before, so
a client uploads the buffers its local training left.
"""

from __future__ import annotations

from typing import Iterable, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, grad, vmap

from fedbench.params import trainable_parameters

FisherEstimator = Literal["empirical", "published"]


def _named_trainable(model: nn.Module) -> dict[str, Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _layerwise_supported(model: nn.Module) -> list[nn.Module] | None:
    """The modules owning trainable parameters, if all are Linear on 2-d inputs' layers or
    plain Conv2d (zero padding, one group); else None."""
    owners = [m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
    for module in owners:
        if isinstance(module, nn.Conv2d):
            if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
                return None
        elif not isinstance(module, nn.Linear):
            return None
    return owners


def layerwise_empirical_fisher(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]],
                               owners: list[nn.Module]) -> list[Tensor] | None:
    """Empirical Fisher from each layer's input and output gradient, without per-sample
    gradients of the whole model: for a Linear layer the per-sample weight gradient is
    ``g_n a_n^T``, so ``sum_n (g_n a_n^T)^2 = (g^2)^T (a^2)``; for a Conv2d layer it is
    ``G_n U_n^T`` with U_n the unfolded input patches (one batched matmul). The output
    gradients of ``sum_n log p(y_n | x_n)`` are per-sample because in eval mode the
    samples of a batch do not interact. Returns None for inputs it does not cover."""
    params = trainable_parameters(model)
    totals = {p: torch.zeros_like(p) for p in params}
    count = 0
    captured: list[tuple[nn.Module, Tensor, Tensor]] = []
    hooks = [m.register_forward_hook(lambda mod, inputs, output: captured.append((mod, inputs[0], output)))
             for m in owners]
    was_training = model.training
    model.eval()
    try:
        for inputs, labels in batches:
            captured.clear()
            log_probs = torch.log_softmax(model(inputs), dim=1)
            objective = log_probs.gather(1, labels.unsqueeze(1)).sum()
            if any(isinstance(m, nn.Linear) and a.ndim != 2 for m, a, _ in captured):
                return None
            grads = torch.autograd.grad(objective, [out for _, _, out in captured])
            with torch.no_grad():
                for (module, activation, _), grad in zip(captured, grads):
                    if isinstance(module, nn.Linear):
                        weight_sq = grad.pow(2).T @ activation.pow(2)
                        bias_grad = grad
                    else:
                        patches = F.unfold(activation.contiguous(), module.kernel_size, module.dilation,
                                           module.padding, module.stride)
                        per_sample = torch.bmm(grad.flatten(2), patches.transpose(1, 2))
                        weight_sq = per_sample.pow(2).sum(dim=0)
                        bias_grad = grad.sum(dim=(2, 3))
                    if module.weight.requires_grad:
                        totals[module.weight] += weight_sq.view_as(module.weight)
                    if module.bias is not None and module.bias.requires_grad:
                        totals[module.bias] += bias_grad.pow(2).sum(dim=0)
            count += len(labels)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return [totals[p] / max(count, 1) for p in params]


def empirical_fisher(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]]) -> list[Tensor]:
    owners = _layerwise_supported(model)
    if owners is not None:
        batches = list(batches)
        result = layerwise_empirical_fisher(model, batches, owners)
        if result is not None:
            return result
    return vmap_empirical_fisher(model, batches)


def vmap_empirical_fisher(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]]) -> list[Tensor]:
    """Per-sample gradients of any model through ``torch.func``."""
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
    model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], estimator: FisherEstimator = "published"
) -> list[Tensor]:
    """Per-parameter-tensor diagonal Fisher, in ``named_parameters()`` order; the model's
    buffers are left exactly as they were."""
    compute = {"empirical": empirical_fisher, "published": published_fisher}.get(estimator)
    if compute is None:
        raise ValueError(f"fisher estimator must be 'empirical' or 'published', not {estimator!r}")
    saved = [b.detach().clone() for b in model.buffers()]
    try:
        return compute(model, batches)
    finally:
        with torch.no_grad():
            for buffer, value in zip(model.buffers(), saved):
                buffer.copy_(value)
