"""Convolutions with each client's own weights as one kernel launch for all clients
(``train.cohort_convolution=triton``: :func:`fedbench.cohort.convolutions_per_client`).

Under ``vmap`` over clients, ``F.conv2d`` with per-client weights becomes one grouped
convolution, which cuDNN runs on an H100 as one launch per client, forward and backward,
plus layout conversions around each (``benchmarks/perf/kernels.py``: at least 2,570
kernels a step of 160 clients, latency-bound). Here the convolution is a custom operator,
``fedbench::client_conv2d``, over ``[K, ...]`` stacks (:mod:`fedbench.client_conv_kernels`:
the formulas, and one Triton launch each for the forward pass, the input gradient and the
weight gradient; the bias gradient is a sum). Its vmap rule folds vmap's client dimension
into the operator's, so the cohort's vmapped model calls it once for every client; its
autograd formula calls the two gradient operators, whose vmap rules fold in the same way.
``torch.compile`` keeps each as one opaque call (shapes from its fake implementation),
inside the step's CUDA graph under ``reduce-overhead``.

Regular autograd only: a custom operator's autograd formula does not run under
``torch.func.grad`` (torch raises), so a compiled cohort's fused step
(:mod:`fedbench.fused_step`) differentiates by autograd with this convolution, which the
compiler traces into the step's graph in torch 2.11 and later (``trace_autograd_ops``,
experimental; before, the autograd step); and no second derivatives.

Numbers: float32 products summed in float32 (full float32, not TF32, whatever
``fabric.tf32`` says), in a fixed order: equal to ``F.conv2d`` up to float rounding, and
bit for bit the same from run to run. Under autocast the inputs are cast to its dtype by
hand, as the grouped cohort's are (:func:`~fedbench.matmul_conv.conv2d_in_autocast_dtype`).
Convolutions it does not compute (groups > 1, string padding, float64, more than 64
channels in or out, a client's input or output of 2**31 values or more) are left to
``F.conv2d``. On a CPU the kernels run only in Triton's interpreter (``TRITON_INTERPRET=1``
set before torch imports Triton): correct, slow, for checking only; and only where that
interpreter runs their loops (a probe kernel, once per process: Triton 3.8.0's does, 3.6.0's,
torch 2.11's, does not, so there the option is refused with the probe's error).
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

from fedbench.matmul_conv import both_sides, conv2d_in_autocast_dtype, in_autocast_dtype, output_size

Geometry = list[int]  # [stride_h, stride_w, padding_h, padding_w, dilation_h, dilation_w]
# The gradients' programs hold every channel of their positions (registers, shared memory):
# wider layers (ResNet-18's 128 to 512) stay torch's. And offsets inside a client are 32-bit.
MAX_CHANNELS = 64
MAX_CLIENT_VALUES = 2**31 - 1


def unavailable(device: torch.device) -> str | None:
    """Why these kernels cannot run on ``device`` (as train.cohort_convolution's allowed
    values read there), or None."""
    try:
        import triton  # noqa: F401  (a CUDA build of torch brings it)
    except ImportError:
        return "grouped or matmul: Triton is not installed (torch's CUDA builds bring it)"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes"):
        return interpreter_fault()
    return (f"grouped or matmul on {device.type}: triton needs a CUDA device (on a CPU, Triton's interpreter, "
            "for checking only: TRITON_INTERPRET=1 in the environment before the process starts)")


@functools.cache
def interpreter_fault() -> str | None:
    """Why this Triton's interpreter cannot run the kernels' loops, or None: it runs a
    probe kernel once per process."""
    import triton

    from fedbench import client_conv_kernels as kernels

    out = torch.zeros(1)
    broken = f"grouped or matmul on cpu: Triton {triton.__version__}'s interpreter"
    try:
        kernels.interpreter_probe[(1,)](out, 3)
    except Exception as err:  # whatever the interpreter raises: reported, not hidden
        return f"{broken} fails here ({err!r})"
    if out.item() != 3:
        return f"{broken} counted {out.item():g} turns of a loop of 3"
    return None


def output_shape(x: Tensor, w: Tensor, geometry: Geometry) -> tuple[int, ...]:
    (sh, sw, ph, pw, dh, dw), (kh, kw) = geometry, w.shape[-2:]
    return (*x.shape[:2], w.shape[1], output_size(x.shape[3], kh, sh, ph, dh), output_size(x.shape[4], kw, sw, pw, dw))


def launch(kernel, grid: tuple[int, ...], *args, **constants) -> None:
    """One launch of a Triton kernel over ``grid``, on torch's current stream, with the
    kernel's warps a program."""
    from fedbench import client_conv_kernels as kernels  # Triton only where this operator runs

    kernel[grid](*args, **constants, num_warps=kernels.warps_of(kernel))


def forward(x: Tensor, w: Tensor, b: Tensor | None, geometry: Geometry) -> Tensor:
    """Client k's images ``x[k]`` ``[N, C, H, W]`` convolved with its weights ``w[k]``
    ``[O, C, KH, KW]`` and bias ``b[k]`` ``[O]``: ``[K, N, O, OH, OW]``, in x's dtype."""
    from fedbench import client_conv_kernels as kernels

    x, w = x.contiguous(), w.contiguous()
    y = x.new_empty(output_shape(x, w, geometry))
    K, N, C, H, W = x.shape
    O, OH, OW = y.shape[2:]
    block_o = kernels.output_channels_per_program(x.device.type, O)
    block_p = kernels.positions_per_program(x.device.type, block_o, N * OH * OW)
    if y.numel():
        launch(kernels.client_conv_forward, (-(-N * OH * OW // block_p), K, -(-O // block_o)),
               x, w, x if b is None else b.contiguous(), y, N, C, H, W, O, OH, OW, *geometry,
               KH=w.shape[3], KW=w.shape[4], HAS_BIAS=b is not None, BLOCK_O=block_o, BLOCK_P=block_p)
    return y


def input_grad(dy: Tensor, w: Tensor, image_size: list[int], geometry: Geometry) -> Tensor:
    """The gradient of the convolution in ``x`` (of ``image_size`` ``[H, W]``), in dy's dtype."""
    from fedbench import client_conv_kernels as kernels

    dy, w = dy.contiguous(), w.contiguous()
    K, N, O, OH, OW = dy.shape
    C, (H, W) = w.shape[2], image_size
    dx = dy.new_empty((K, N, C, H, W))
    block_p = kernels.positions_per_program(dy.device.type, C, N * H * W)
    if dx.numel():
        launch(kernels.client_conv_input_grad, (-(-N * H * W // block_p), K),
               dy, w, dx, N, C, H, W, O, OH, OW, *geometry, KH=w.shape[3], KW=w.shape[4],
               BLOCK_C=kernels.block(C), BLOCK_P=block_p)
    return dx


def weight_grad(dy: Tensor, x: Tensor, kernel_size: list[int], geometry: Geometry) -> Tensor:
    """The gradient of the convolution in ``w`` (of ``kernel_size`` ``[KH, KW]``), in dy's dtype."""
    from fedbench import client_conv_kernels as kernels

    dy, x = dy.contiguous(), x.contiguous()
    K, N, O, OH, OW = dy.shape
    C, H, W = x.shape[2:]
    taps = C * kernel_size[0] * kernel_size[1]
    block_t, block_r, splits = kernels.weight_grad_blocks(dy.device.type, taps, N * OH * OW, O)
    partial = dy.new_empty((K, splits, O, taps), dtype=torch.float32)  # every program stores its whole tile
    if partial.numel():
        launch(kernels.client_conv_weight_grad, (K, -(-taps // block_t), splits),
               dy, x, partial, N, C, H, W, O, OH, OW, *geometry, splits, KH=kernel_size[0], KW=kernel_size[1],
               BLOCK_O=kernels.block(O, least=16), BLOCK_T=block_t, BLOCK_R=block_r)
    return partial.sum(1).view(K, O, C, *kernel_size).to(dy.dtype)


client_conv2d = torch.library.custom_op("fedbench::client_conv2d", forward, mutates_args=())
client_conv2d_input_grad = torch.library.custom_op("fedbench::client_conv2d_input_grad", input_grad, mutates_args=())
client_conv2d_weight_grad = torch.library.custom_op("fedbench::client_conv2d_weight_grad", weight_grad,
                                                    mutates_args=())


@client_conv2d.register_fake
def _(x: Tensor, w: Tensor, b: Tensor | None, geometry: Geometry) -> Tensor:
    return x.new_empty(output_shape(x, w, geometry))


@client_conv2d_input_grad.register_fake
def _(dy: Tensor, w: Tensor, image_size: list[int], geometry: Geometry) -> Tensor:
    return dy.new_empty((*dy.shape[:2], w.shape[2], *image_size))


@client_conv2d_weight_grad.register_fake
def _(dy: Tensor, x: Tensor, kernel_size: list[int], geometry: Geometry) -> Tensor:
    return dy.new_empty((dy.shape[0], dy.shape[2], x.shape[2], *kernel_size))


def setup_context(ctx, inputs: tuple, output: Tensor) -> None:
    x, w, b, geometry = inputs
    ctx.save_for_backward(x, w)
    ctx.geometry, ctx.has_bias = geometry, b is not None


def backward(ctx, dy: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
    """dx and dw by their operators (first derivatives only: they have no gradient of
    their own), db as dy's sum over images and positions."""
    x, w = ctx.saved_tensors
    dx = dw = db = None
    if ctx.needs_input_grad[0]:
        dx = client_conv2d_input_grad(dy, w, list(x.shape[-2:]), ctx.geometry).to(x.dtype)
    if ctx.needs_input_grad[1]:
        dw = client_conv2d_weight_grad(dy, x, list(w.shape[-2:]), ctx.geometry).to(w.dtype)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        db = dy.sum((1, 3, 4))
    return dx, dw, db, None


client_conv2d.register_autograd(backward, setup_context=setup_context)


def clients_folded(batch_size: int, tensor: Tensor | None, dim: int | None) -> Tensor | None:
    """A ``[V, K, ...]`` tensor vmapped at ``dim`` (None: the same for every vmapped row)
    as ``[V*K, ...]``: vmap's rows become more clients of the operator."""
    if tensor is None:
        return None
    tensor = tensor.expand(batch_size, *tensor.shape) if dim is None else tensor.movedim(dim, 0)
    return tensor.flatten(0, 1).contiguous()  # the kernels' layout, and what autograd saves


def folding_vmap_rule(operator):
    """A vmap rule that calls ``operator`` once over vmap's rows times its own clients."""

    def rule(info, in_dims: tuple, *args):
        tensors = [clients_folded(info.batch_size, a, d) if isinstance(a, Tensor) else a for a, d in zip(args, in_dims)]
        return operator(*tensors).unflatten(0, (info.batch_size, -1)), 0

    return rule


for _operator in (client_conv2d, client_conv2d_input_grad, client_conv2d_weight_grad):
    _operator.register_vmap(folding_vmap_rule(_operator))


def conv2d_per_client(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0,
                      dilation=1, groups: int = 1) -> Tensor:
    """``F.conv2d``'s result from :func:`client_conv2d` (one client here; under ``vmap``
    every client in one call). What the kernels do not compute goes to ``F.conv2d``:
    groups > 1, string padding, float64, more than MAX_CHANNELS channels in or out, or a
    client's input or output of 2**31 values or more."""
    if groups != 1 or isinstance(padding, str) or torch.float64 in (input.dtype, weight.dtype) \
            or max(weight.shape[:2]) > MAX_CHANNELS:
        return conv2d_in_autocast_dtype(input, weight, bias, stride, padding, dilation, groups)
    geometry = [*both_sides(stride), *both_sides(padding), *both_sides(dilation)]
    unbatched = input.dim() == 3
    images = input.unsqueeze(0) if unbatched else input
    sides = [output_size(images.shape[2 + d], weight.shape[2 + d], geometry[d], geometry[2 + d], geometry[4 + d])
             for d in (0, 1)]
    if max(images.numel(), images.shape[0] * weight.shape[0] * sides[0] * sides[1]) > MAX_CLIENT_VALUES:
        return conv2d_in_autocast_dtype(input, weight, bias, stride, padding, dilation, groups)
    images, weight, bias = in_autocast_dtype(images, weight, bias)
    if images.dtype != weight.dtype:  # F.conv2d's rule, which the kernels would not check
        raise RuntimeError(f"Input type ({images.dtype}) and weight type ({weight.dtype}) should be the same")
    out = client_conv2d(images[None], weight[None], None if bias is None else bias[None], geometry)[0]
    return out.squeeze(0) if unbatched else out
