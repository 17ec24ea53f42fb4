"""``torch.compile`` as the cohort uses it: static graphs, deterministic kernels, and the
tensors a CUDA graph may keep where they are."""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import torch
from torch import Tensor

Result = TypeVar("Result")

# vmap specialises a graph on its batch size, so every cohort size and batch shape a process
# meets compiles once: allow that many graphs before torch would fall back to eager.
SHAPES_PER_COMPILED_FUNCTION = 256


def traces_autograd() -> bool:
    """Whether this torch's compiler can trace ``torch.autograd.grad`` into a graph
    (``torch._dynamo.config.trace_autograd_ops``, torch 2.11 and later; experimental)."""
    import torch._dynamo.config

    return hasattr(torch._dynamo.config, "trace_autograd_ops")


def compiled(fn: Callable[..., Result], mode: str | None, trace_autograd: bool = False) -> Callable[..., Result]:
    """``fn`` itself (``mode`` None) or ``torch.compile(fn, mode=mode, dynamic=False)``: a
    static graph per input shape, so which kernels compute a step depends on its shapes
    only, never on which shapes came earlier in the process (a resumed run gives the same
    numbers as one that ran through; verified on CPU, on CUDA with inductor's
    deterministic switch on, untested on a GPU yet). The max-autotune modes, which pick
    kernels by timing them, are not offered. ``trace_autograd``: ``torch.autograd.grad``
    inside ``fn`` is traced into its graph (:func:`traces_autograd` must hold) rather than
    breaking it."""
    if mode is None:
        return fn
    import torch._dynamo  # only a compiling run pays for importing the compiler
    import torch._inductor.config as inductor_config

    compiled_fn = torch.compile(fn, mode=mode, dynamic=False)
    # On CUDA inductor benchmarks Triton reduction configs, which sum in other orders: its
    # deterministic switch (where this torch has it) turns that choice by timing off.
    deterministic = {"deterministic": True} if hasattr(inductor_config, "deterministic") else {}

    dynamo_options = {"recompile_limit": SHAPES_PER_COMPILED_FUNCTION}
    if trace_autograd:
        dynamo_options["trace_autograd_ops"] = True

    def call(*args: object) -> Result:
        with torch._dynamo.config.patch(**dynamo_options), inductor_config.patch(**deterministic):
            return compiled_fn(*args)

    return call


@functools.cache
def compiled_once(fn: Callable[..., Result], mode: str, trace_autograd: bool = False) -> Callable[..., Result]:
    """:func:`compiled` made once per function and mode for the whole process, so that the
    graphs torch.compile keeps for it (per model, shape, ...) serve every later call."""
    return compiled(fn, mode, trace_autograd)


def mark_static(tree: object) -> None:
    """Marks every tensor in ``tree`` (nested tuples, lists, dicts) as a static input of the
    compiled functions it is passed to: under ``reduce-overhead`` a CUDA graph then reads
    and updates it in place, instead of copying it into the graph's own memory at every
    call (a data pool of tens of MB), or, for a tensor the graph updates in place (the
    parameter stacks), skipping the CUDA graph altogether. Unguarded: a new address (the
    next round's stacks) makes the graph record again, not recompile."""
    import torch._dynamo

    for tensor in torch.utils._pytree.tree_leaves(tree):
        if isinstance(tensor, Tensor):
            torch._dynamo.mark_static_address(tensor)


def step_begins(mode: str | None) -> None:
    """Under ``reduce-overhead``: a new training step begins (CUDA graph trees then replay
    the step's graphs from their root; the last step's graph outputs are dead). The cohort
    holds no graph output across steps."""
    if mode == "reduce-overhead":
        torch.compiler.cudagraph_mark_step_begin()


class StableTensors:
    """Tensors that keep their device address from round to round. ``stable(key, value)``
    copies ``value`` into the tensor kept under ``key`` and returns that one, when their
    shape, dtype, device and strides match; otherwise it keeps ``value``. Under
    ``reduce-overhead`` a CUDA graph whose static input moved records itself again and keeps
    the old recording (and its memory) beside it, so a compiled cohort keeps every tensor
    its graphs read or update across steps here: each round's stacks, momenta, loss totals,
    epoch tables and triggers, under ``reduce-overhead`` only (other modes need no fixed
    address). What it keeps stays allocated between rounds, through evaluation: for
    ResNet-18, 10 clients and SDFC's pull, about 0.9 GB of anchors and scales besides the
    parameter and momentum stacks."""

    def __init__(self) -> None:
        self.kept: dict[tuple, Tensor] = {}

    def __call__(self, key: tuple, value: Tensor) -> Tensor:
        kept = self.kept.get(key)
        if kept is None or self.layout(kept) != self.layout(value):
            self.kept[key] = value
            return value
        with torch.no_grad():
            return kept.copy_(value)

    @staticmethod
    def layout(tensor: Tensor) -> tuple:
        return tensor.shape, tensor.dtype, tensor.device, tensor.stride()


def unstable(key: tuple, value: Tensor) -> Tensor:
    """The :class:`StableTensors` interface where addresses need not stay: ``value`` itself."""
    return value
