"""Convolutions as matrix products over unfolded patches, for the cohort
(``train.cohort_convolution=matmul``: :func:`fedbench.cohort.convolutions_as_matmul`).

Under ``vmap`` over clients, a convolution whose weights differ per client becomes one
grouped convolution (a group per client: for the papers' simple_cnn, 1-or-3 to 6 and 6 to
16 channels per group), a shape for which cuDNN may have no fast kernel. Here the same
convolution is ``out[n, o, p] = sum_k W[o, k] * P[n, k, p] + b[o]``, with ``P = unfold(x)``
the ``C*kh*kw`` input values under the kernel at each output position ``p`` (zero padding,
stride and dilation as given): under vmap one batched matrix product with each client's
own weights. Same numbers up to float rounding (another summation order); it stores the
patches, ``kh*kw`` times the input, for the backward pass. The output is contiguous (NCHW)
whatever the input's layout. On a GPU the precision differs too: torch lets cuDNN
convolve float32 in TF32 by default (``torch.backends.cudnn.allow_tf32``), while float32
matrix products are full float32 unless ``torch.set_float32_matmul_precision`` says otherwise.

Convolutions it cannot compute this way (groups > 1, string padding) are left to
``F.conv2d`` (through :func:`conv2d_in_autocast_dtype`, which the grouped cohort uses too).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _pair

CONVOLUTIONS = ("grouped", "matmul", "triton")  # train.cohort_convolution's values
TORCH_CONV2D = F.conv2d  # torch's own (the cohort replaces F.conv2d while its model runs)


def conv2d_as_matmul(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0,
                     dilation=1, groups: int = 1) -> Tensor:
    """``F.conv2d``'s result, computed as the weights ``[O, C*kh*kw]`` times the unfolded
    patches ``[N, C*kh*kw, H'*W']`` of each image, plus the bias."""
    if groups != 1 or isinstance(padding, str):
        return conv2d_in_autocast_dtype(input, weight, bias, stride, padding, dilation, groups)
    unbatched = input.dim() == 3
    images = input.unsqueeze(0) if unbatched else input
    kernel, stride, padding, dilation = (both_sides(v) for v in (weight.shape[-2:], stride, padding, dilation))
    height, width = (output_size(*sizes) for sizes in zip(images.shape[-2:], kernel, stride, padding, dilation))
    patches = F.unfold(images, kernel, dilation=dilation, padding=padding, stride=stride)
    out = weight.flatten(1) @ patches
    if bias is not None:  # in the product's dtype: under autocast bf16 stays bf16, as torch's convolution's
        out = out + bias.to(out.dtype)[:, None]
    out = out.view(images.shape[0], weight.shape[0], height, width)
    return out.squeeze(0) if unbatched else out


def output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """A convolution's output length along one side, as ``F.conv2d`` computes it."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def both_sides(value) -> tuple[int, int]:
    """An int, or a tuple of one or two, as (height, width), as ``F.conv2d`` reads them."""
    pair = tuple(_pair(value))
    return pair * 2 if len(pair) == 1 else pair


def conv2d_in_autocast_dtype(input: Tensor, weight: Tensor, bias: Tensor | None = None, *args, **kwargs) -> Tensor:
    """``F.conv2d`` with autocast's policy for it applied by hand: under autocast, its
    float32 and float16/bf16 tensors (not float64, as autocast leaves those) in the
    autocast dtype. Under ``vmap`` a convolution reaches autocast as ``aten.convolution``,
    which CPU autocast does not cast (CUDA's does): a bf16-mixed cohort on CPU convolved in
    float32 where sequential training convolves in bf16, until 2026-11-27."""
    return TORCH_CONV2D(*in_autocast_dtype(input, weight, bias), *args, **kwargs)


def in_autocast_dtype(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """The tensors as autocast would cast a convolution's: under autocast on their device,
    float32 and float16/bf16 ones (not float64) in the autocast dtype; otherwise unchanged."""
    device = next(t for t in tensors if t is not None).device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in tensors)
