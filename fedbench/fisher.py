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

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterable, Iterator, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, grad, vmap

from fedbench.params import trainable_parameters

FisherEstimator = Literal["empirical", "published"]

# train.compile's mode and train.cohort_convolution for cohort_fishers' passes, set by the
# engine around a cohort's hooks (they are the defense's code: the settings reach them
# without passing through it)
_COMPILE_MODE: ContextVar[str | None] = ContextVar("fisher_compile_mode", default=None)
_CONVOLUTION: ContextVar[str] = ContextVar("fisher_convolution", default="grouped")
GroupSums = Callable[..., dict[str, Tensor]]


@contextmanager
def cohort_passes(mode: str | None, convolution: str = "grouped") -> Iterator[None]:
    """While open, :func:`cohort_fishers` compiles its passes over the whole cohort with
    ``torch.compile`` in ``mode`` (``train.compile``; None: not compiled) and computes their
    convolutions as the cohort's training does (``train.cohort_convolution``: ``grouped``,
    ``matmul`` or ``triton``; :func:`cohort_fishers` says where ``triton`` stays grouped)."""
    tokens = _COMPILE_MODE.set(mode), _CONVOLUTION.set(convolution)
    try:
        yield
    finally:
        _COMPILE_MODE.reset(tokens[0])
        _CONVOLUTION.reset(tokens[1])


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


# A cohort's per-sample gradients ([rows, batch, parameters] floats) are computed for at
# most this many bytes at a time (the empirical estimator), or one row's when a row is
# more (ResNet-18: 2.7 GiB at batch 64, as one client's sequential computation); more rows
# go in turns.
PER_SAMPLE_BYTES = 2 ** 30


def cohort_fishers(models: list[nn.Module], streams: list[Iterable[tuple[Tensor, Tensor]]],
                   estimator: FisherEstimator = "published",
                   explicit_batch_norm: bool | None = None) -> list[list[Tensor]]:
    """Every model's diagonal Fisher on its own batches (``streams[k]`` for ``models[k]``),
    with :func:`diagonal_fisher`'s conventions, for models of one architecture computed
    together: each step takes every model's next batch and runs one ``vmap``ped pass over
    the stacked models (those whose batches share a shape), so a step of K models costs
    the launches of one (a cohort's Fisher on a GPU; equal to each model alone to float
    rounding). The models, buffers and modes included, are left as they were. Go one by
    one: models the cohort cannot vmap (random layers, BatchNorm(momentum=None)) and, for
    the published estimator, which keeps each model's modes, models whose modes differ.
    Inside :func:`cohort_passes` the steps are compiled (a graph per batch shape and
    number of rows; steps over fewer models, once some models' batches are done, in rows
    of K, ceil(K/2) or ceil(K/4): :func:`_cohort_sums`), and the convolutions are the
    cohort's: ``matmul`` for both estimators; ``triton`` (one launch for every model's
    convolution) for the published estimator, whose batch gradients then come from
    autograd of the models' summed objectives (row k's part is model k's own: the models
    share nothing), as the Triton cohort's training step gets its gradients; the empirical
    estimator's per-sample gradients need ``torch.func``, which cannot differentiate the
    Triton operator, so its convolutions stay grouped.
    ``explicit_batch_norm`` (default: on CUDA, where cuDNN's refuses vmap) computes
    BatchNorm in tensor operations."""
    from fedbench.cohort import batch_norm_as_tensor_ops, cohort_cannot_train, convolutions_as_matmul, \
        convolutions_per_client, vmappable  # cohort imports defenses

    template = models[0]
    modes = [[module.training for module in model.modules()] for model in models]
    if (len(models) == 1 or cohort_cannot_train(template, "32-true") is not None
            or estimator == "published" and any(mode != modes[0] for mode in modes)):
        return [diagonal_fisher(model, stream, estimator) for model, stream in zip(models, streams)]
    if estimator not in ("empirical", "published"):
        raise ValueError(f"fisher estimator must be 'empirical' or 'published', not {estimator!r}")
    trainable = [name for name, p in template.named_parameters() if p.requires_grad]
    fixed = [name for name, p in template.named_parameters() if not p.requires_grad]
    fixed += [name for name, _ in template.named_buffers()]
    state = [dict(model.named_parameters()) | dict(model.named_buffers()) for model in models]
    with torch.no_grad():
        params = {name: vmappable(torch.stack([s[name] for s in state])) for name in trainable}
        # copies: in training mode BatchNorm updates its running statistics (which the
        # published estimator never reads) in place
        others = {name: vmappable(torch.stack([s[name] for s in state])) for name in fixed}
    if estimator == "empirical":
        template.eval()
    cuda = params[trainable[0]].device.type == "cuda"
    convolution = _CONVOLUTION.get()
    by_autograd = convolution == "triton" and estimator == "published"
    try:
        with (batch_norm_as_tensor_ops(cuda if explicit_batch_norm is None else explicit_batch_norm),
              convolutions_as_matmul(convolution == "matmul"), convolutions_per_client(by_autograd)):
            totals, counts = _cohort_sums(template, params, others, streams, estimator, by_autograd)
    finally:
        for module, training in zip(template.modules(), modes[0]):
            module.training = training
    divisors = torch.tensor([max(count, 1) for count in counts], dtype=torch.float64)
    fishers = []
    for total in totals.values():
        mean = total / divisors.to(total.device, total.dtype).view(-1, *[1] * (total.ndim - 1))
        fishers.append(mean.pow(2) if estimator == "published" else mean)
    return [list(per_model) for per_model in zip(*(fisher.unbind(0) for fisher in fishers))]


def _cohort_sums(template: nn.Module, params: dict[str, Tensor], others: dict[str, Tensor],
                 streams: list[Iterable[tuple[Tensor, Tensor]]], estimator: FisherEstimator,
                 by_autograd: bool = False) -> tuple[dict[str, Tensor], list[int]]:
    """Per model, the sum over its batches of the batch-mean gradient (published; counts:
    batches) or of the squared per-sample gradients (empirical; counts: samples).

    Compiled (:func:`cohort_passes`), every step over all models runs compiled, and so
    does a step of the first step's batch shape over fewer models, once some models'
    batches are done: it computes the rows the training cohort would
    (``fedbench.cohort.bucket_rows``: K, ceil(K/2) or ceil(K/4)), the done models riding
    along on a live model's batch, their sums dropped; at most three graphs a shape. A
    step over fewer models in another shape (a stream's short last batch) runs uncompiled
    over its models alone. ``by_autograd``: :func:`_group_sums_by_autograd` (published only)."""
    from fedbench.cohort import bucket_rows, next_batches, same_shape_groups  # cohort imports defenses

    whole = _whole_cohort_sums(_COMPILE_MODE.get(), by_autograd)
    single = _group_sums_by_autograd if by_autograd else _group_sums
    totals = {name: torch.zeros_like(p) for name, p in params.items()}
    models = len(streams)
    counts = [0] * models
    iterators = [iter(stream) for stream in streams]
    live = list(range(models))
    index = _IndexTensors(next(iter(params.values())).device)
    full_shape = None  # the shape of the first step's largest group: the streams' full batches
    while live:
        batches = next_batches(iterators, live)
        live = list(batches)
        groups = same_shape_groups(batches, lambda batch: tuple(batch[0].shape))
        if full_shape is None and groups:
            full_shape = tuple(batches[max(groups, key=len)[0]][0].shape)
        for group in groups:
            padded = whole is not None and len(group) < models and tuple(batches[group[0]][0].shape) == full_shape
            rows = bucket_rows(group, models) if padded else group
            compute = whole if whole is not None and (padded or len(group) == models) else single
            sums = _rows_sums(template, params, others, batches, group, rows, estimator, compute, index)
            if len(group) == models:
                torch._foreach_add_(list(totals.values()), [sums[name] for name in totals])
            else:
                for name, total in totals.items():
                    total.index_add_(0, index(group), sums[name])
            for k in group:
                counts[k] += 1 if estimator == "published" else len(batches[k][1])
    return totals, counts


class _IndexTensors:
    """Index tensors on the device, each made once per list of values."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.made = device, {}

    def __call__(self, values: list[int]) -> Tensor:
        key = tuple(values)
        if key not in self.made:
            self.made[key] = torch.tensor(values, device=self.device)
        return self.made[key]


def _rows_sums(template: nn.Module, params: dict[str, Tensor], others: dict[str, Tensor],
               batches: dict[int, tuple[Tensor, Tensor]], group: list[int], rows: list[int],
               estimator: FisherEstimator, compute: GroupSums, index: _IndexTensors) -> dict[str, Tensor]:
    """One step's sums for the models of ``group`` (in its order), computed over ``rows``:
    ``group`` and models riding along on ``group[0]``'s batch, whose sums are dropped."""
    from fedbench.cohort import vmappable

    chosen = (params, others)
    if len(rows) < len(next(iter(params.values()))):
        chosen = ({n: p.index_select(0, index(rows)) for n, p in params.items()},
                  {n: b.index_select(0, index(rows)) for n, b in others.items()})
    members = set(group)
    feed = [k if k in members else group[0] for k in rows]
    inputs = vmappable(torch.stack([batches[k][0] for k in feed]))
    labels = torch.stack([batches[k][1] for k in feed])
    sums = compute(template, *chosen, inputs, labels, estimator)
    if len(rows) == len(group):
        return sums
    kept = index([rows.index(k) for k in group])
    return {name: value.index_select(0, kept) for name, value in sums.items()}


def _whole_cohort_sums(mode: str | None, by_autograd: bool = False) -> GroupSums | None:
    """:func:`_group_sums` (``by_autograd``: :func:`_group_sums_by_autograd`) compiled in
    ``mode`` (a graph for each model, estimator and batch shape it meets, kept for the next
    rounds), under ``reduce-overhead`` marking each step's start; None when ``mode`` is None,
    or ``by_autograd`` where this torch's compiler cannot trace autograd."""
    from fedbench.compiling import compiled_once, step_begins, traces_autograd

    if mode is None or by_autograd and not traces_autograd():
        return None
    fn = _group_sums_by_autograd if by_autograd else _group_sums
    compiled_sums = compiled_once(fn, mode, by_autograd)  # a graph per model, estimator and shape, kept

    def sums(*args: object) -> dict[str, Tensor]:
        step_begins(mode)  # the sums are added to the totals before the next step
        return compiled_sums(*args)

    return sums


def _group_sums(template: nn.Module, params: dict[str, Tensor], others: dict[str, Tensor], inputs: Tensor,
                labels: Tensor, estimator: FisherEstimator) -> dict[str, Tensor]:
    """One batch of each of G models: ``[G, ...]`` per trainable parameter."""
    if estimator == "published":
        return vmap(grad(_published_objective(template)))(params, others, inputs, labels)

    def log_likelihood(p: dict[str, Tensor], o: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        logits = functional_call(template, (p, o), (x.unsqueeze(0),))
        return torch.log_softmax(logits, dim=1)[0].gather(0, y.unsqueeze(0)).squeeze(0)

    def squared_sum(p: dict[str, Tensor], o: dict[str, Tensor], x: Tensor, y: Tensor) -> dict[str, Tensor]:
        per_sample = vmap(grad(log_likelihood), in_dims=(None, None, 0, 0))(p, o, x, y)
        return {name: g.pow(2).sum(dim=0) for name, g in per_sample.items()}

    rows, batch = inputs.shape[0], inputs.shape[1]
    per_row = batch * sum(p[0].numel() * p.element_size() for p in params.values())
    step = max(1, PER_SAMPLE_BYTES // per_row)
    parts = [vmap(squared_sum)(*({n: t[r:r + step] for n, t in d.items()} for d in (params, others)),
                               inputs[r:r + step], labels[r:r + step]) for r in range(0, rows, step)]
    return parts[0] if len(parts) == 1 else {name: torch.cat([part[name] for part in parts]) for name in parts[0]}


def _published_objective(template: nn.Module) -> Callable[..., Tensor]:
    """One model's ``L_b`` on one batch, as published (see the module's docstring)."""
    def batch_objective(p: dict[str, Tensor], o: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        log_probs = torch.log_softmax(functional_call(template, (p, o), (x,)), dim=1)
        return log_probs[:, y].mean()  # [B, B]: every (sample, label) pair, as published

    return batch_objective


def _group_sums_by_autograd(template: nn.Module, params: dict[str, Tensor], others: dict[str, Tensor],
                            inputs: Tensor, labels: Tensor, estimator: FisherEstimator) -> dict[str, Tensor]:
    """:func:`_group_sums` of the published estimator by autograd: the gradient of the G
    models' summed ``L_b`` in their stacked parameters, whose row k is model k's own."""
    if estimator != "published":
        raise ValueError("by autograd, only the published estimator's batch gradients (no per-sample ones)")
    with torch.enable_grad():
        leaves = {name: p.detach().requires_grad_() for name, p in params.items()}
        objectives = vmap(_published_objective(template))(leaves, others, inputs, labels)
        # a parameter the objective does not reach gets 0, as torch.func.grad gives it
        grads = torch.autograd.grad(objectives.sum(), list(leaves.values()), allow_unused=True, materialize_grads=True)
    return dict(zip(leaves, grads))
