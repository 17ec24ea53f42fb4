"""(k) The cohort's convolutions alone: each of simple_cnn's two convolutions with every
client's own weights, forward and backward, under each cuDNN setting.

On an H100 (2026-11-27) a compiled cohort step of 160 clients was at least 2,570 kernels,
most of them cuDNN's: its grouped convolution (what ``vmap`` makes of a convolution whose
weights differ per client) ran one TF32 kernel per client, with layout conversions of each
client's slice around it (`benchmarks/perf/README.md`). ``kernels.py`` times whole steps,
a compile per variant; this times the convolution alone, uncompiled, so one short call
can try each cuDNN setting that might give one launch for all clients: ``vmap(F.conv2d)``,
cuDNN's grouped convolution as the cohort runs it (``train.cohort_convolution=grouped``),
with cuDNN's convolutions in TF32 (``grouped``: torch's default, ``fabric.tf32=convolutions``)
or full float32 (``_fp32``: ``fabric.tf32=none``), with cuDNN's autotuner (``_autotuned``:
``torch.backends.cudnn.benchmark``), or under bf16 autocast (``_bf16``); and ``triton``,
every client's convolution as one Triton kernel launch, forward, input gradient and weight
gradient each (``train.cohort_convolution=triton``, ``fedbench.client_conv``; full float32;
on CPU Triton's interpreter, if ``TRITON_INTERPRET=1`` was set before the process started:
a dry run only, very slow at the default sizes). The convolutions
as matrix products (``train.cohort_convolution=matmul``) are left to ``kernels.py``:
uncompiled, ``vmap`` has no batching rule for their patches' ``im2col`` and runs it client
by client (about 250 aten ops per client and call on CPU), which the compiled cohort does not.

For each shape (``conv1``: 3 to 6 channels on 32x32 images, ``conv2``: 6 to 16 on 14x14,
5x5 kernels) it prints ms per forward and backward (the best of ``--repeat`` calls after
one that warms up, and autotunes where the variant does; gradients of the weights, the
bias and, for ``conv2``, the input, as a training step needs) and the kernels of one call
(on CPU, the innermost aten ops that compute), each variant in a process of its own.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.func import vmap

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[2]))
from cohort import best_seconds, kernels_of  # noqa: E402
from common import in_fresh_process, machine, table  # noqa: E402

from fedbench.experiment import FabricConfig  # noqa: E402
from fedbench.matmul_conv import conv2d_in_autocast_dtype  # noqa: E402

# name: (in channels, out channels, image side, whether the input needs its gradient)
SHAPES = {"conv1": (3, 6, 32, False), "conv2": (6, 16, 14, True)}
KERNEL = 5


@dataclass(frozen=True)
class Variant:
    name: str
    tf32: str = "convolutions"  # fabric.tf32
    autotuned: bool = False
    bf16: bool = False
    convolution: str = "grouped"  # train.cohort_convolution


VARIANTS = {v.name: v for v in (
    Variant("grouped"), Variant("grouped_fp32", tf32="none"), Variant("grouped_autotuned", autotuned=True),
    Variant("grouped_fp32_autotuned", tf32="none", autotuned=True), Variant("grouped_bf16", bf16=True),
    Variant("triton", convolution="triton"))}


def convolution_of(variant: Variant):
    """The cohort's convolution for one client (vmapped over all of them): cuDNN's, cast by
    hand under autocast as the cohort casts it, or the Triton kernels' (which cast too)."""
    if variant.convolution == "triton":
        from fedbench.client_conv import conv2d_per_client

        return conv2d_per_client
    return conv2d_in_autocast_dtype


@contextmanager
def settings(variant: Variant) -> Iterator[None]:
    """The variant's process-wide switches (TF32, cuDNN's autotuner), put back afterwards."""
    cudnn = torch.backends.cudnn
    before = cudnn.allow_tf32, torch.get_float32_matmul_precision(), cudnn.benchmark
    FabricConfig(tf32=variant.tf32).apply_tf32(torch.device("cuda"))  # the switches a CUDA run of it sets
    cudnn.benchmark = variant.autotuned
    try:
        yield
    finally:
        cudnn.allow_tf32, cudnn.benchmark = before[0], before[2]
        torch.set_float32_matmul_precision(before[1])


def inputs(shape: str, clients: int, batch: int, device: str, dtype=torch.float32) -> tuple[torch.Tensor, ...]:
    """Every client's batch ``[K, B, C, H, W]``, weights ``[K, O, C, 5, 5]`` and biases ``[K, O]``."""
    c_in, c_out, side, input_grad = SHAPES[shape]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(clients, batch, c_in, side, side, generator=generator, dtype=dtype).to(device)
    w = (0.1 * torch.randn(clients, c_out, c_in, KERNEL, KERNEL, generator=generator, dtype=dtype)).to(device)
    b = torch.randn(clients, c_out, generator=generator, dtype=dtype).to(device)
    return x.requires_grad_(input_grad), w.requires_grad_(), b.requires_grad_()


def forward_backward(variant: Variant, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> list[torch.Tensor]:
    """The cohort's convolution and the gradients a training step takes of it (a fixed
    upstream gradient: the output's sum)."""
    autocast = torch.autocast(x.device.type, dtype=torch.bfloat16) if variant.bf16 else nullcontext()
    with autocast:  # cast by hand under autocast, as the cohort does (CPU autocast misses vmap's convolution)
        out = vmap(convolution_of(variant))(x, w, b)
    wanted = [t for t in (x, w, b) if t.requires_grad]
    return [out.detach()] + list(torch.autograd.grad(out.sum(), wanted))


def measure_variant(variant: Variant, args) -> list[list]:
    return [measure(shape, variant, args) for shape in args.shapes]


def measure(shape: str, variant: Variant, args) -> list:
    x, w, b = inputs(shape, args.clients, args.batch, args.device)
    cuda = x.is_cuda
    with settings(variant):
        seconds = best_seconds(lambda: forward_backward(variant, x, w, b), args.repeat, cuda)
        launches = kernels_of(lambda: forward_backward(variant, x, w, b), cuda)
    return [shape, variant.name, round(1000 * seconds, 3), launches, round(launches / args.clients, 1)]


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=160, help="clients in the cohort (16 paper cells: 160)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args(argv)
    rows = []
    for name in args.variants:
        # a process per variant: cuDNN's plan cache does not key on the autotuner's switch, so
        # an autotuned variant after its twin would reuse the twin's heuristic plans
        rows += in_fresh_process(measure_variant, VARIANTS[name], args)
        print("\n".join("| " + " | ".join(map(str, row)) + " |" for row in rows[-len(args.shapes):]),
              file=sys.stderr, flush=True)
    rows.sort(key=lambda row: args.shapes.index(row[0]))  # by shape, variants in their order
    unit = "CUDA kernels" if args.device != "cpu" else "aten ops (CPU)"
    text = (f"### The cohort's convolutions alone, forward and backward: {args.clients} clients x {args.batch} "
            f"images, {machine()}\n\n"
            + table(["convolution", "variant", "ms", f"{unit} per call", "per client"], rows) + "\n")
    print(text, flush=True)
    return text


if __name__ == "__main__":
    main()
