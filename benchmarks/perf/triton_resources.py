"""(l) What the Triton convolution's programs ask of a GPU, without one: registers, spills,
shared memory, and so how many programs an SM holds at once.

``train.cohort_convolution=triton`` (``fedbench.client_conv_kernels``) has not run on a GPU
yet; its kernels are latency-bound gathers (a few multiply-adds per load), whose speed
depends on how many programs an SM keeps in flight to hide the loads' latency. Each kernel
is compiled here by Triton's own compiler for an H100 (sm_90) at the GPU's block sizes and warps,
and ``ptxas -v`` (Triton's) reports its registers a thread and the bytes a thread spills
to local memory. Programs an SM holds, by registers: an H100 SM has 65,536 registers, given
out per warp in units of 256 (8 a thread), at most 32 programs and 64 warps:
``min(32, 64 // warps, 65536 // (ceil(registers / 8) * 8 * 32 * warps))``; by shared
memory, ``228 KB // (shared + 1 KB)`` (the 1 KB the SM reserves per program). Arithmetic
from ptxas's numbers, not a measurement of speed. Needs Triton's CUDA backend and its
interpreter off (``TRITON_INTERPRET`` unset); about 20 s.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).parent))

from common import table  # noqa: E402

H100 = {"registers": 65536, "programs": 32, "warps": 64, "shared": 228 * 1024, "reserved": 1024}
# (dtype, channels in and out, kernels): simple_cnn's layers (3 -> 6 and 6 -> 16 take the
# blocks of 6 channels), and ResNet-18's 64-channel layers, the widest the operator takes
SETTINGS = [("fp32", 6, None), ("bf16", 6, None), ("fp32", 64, None)]


def programs_per_sm(registers: int, shared_bytes: int, warps: int, sm: dict[str, int] = H100) -> int:
    """Programs of ``warps`` warps an SM holds at once, by registers and by shared memory.
    For programs of a multiple of 4 warps (the kernels use 4): an H100 SM splits its
    registers in four, one part per warp scheduler, which the formula ignores."""
    if warps % 4:
        raise ValueError(f"warps={warps}: the formula holds for a multiple of 4 warps")
    by_registers = sm["registers"] // (math.ceil(registers / 8) * 8 * 32 * warps)
    by_shared = sm["shared"] // (shared_bytes + sm["reserved"]) if shared_bytes else sm["programs"]
    return min(sm["programs"], sm["warps"] // warps, by_registers, by_shared)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--capability", type=int, default=90, help="the GPU's compute capability (90: H100)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET"):
        return "### The Triton convolution's programs: skipped (TRITON_INTERPRET is set: the compiler is off)\n"
    import importlib.util

    if importlib.util.find_spec("triton") is None or importlib.util.find_spec("triton.backends.nvidia") is None:
        return "### The Triton convolution's programs: skipped (no Triton with a CUDA backend here)\n"
    import triton

    from fedbench import client_conv_kernels as kernels

    rows = []
    for dtype, channels, names in SETTINGS:
        for name, kernel in kernels.compiled_for_gpu(args.capability, dtype, channels, names).items():
            programs = programs_per_sm(kernel.registers, kernel.shared_bytes, kernel.warps)
            rows.append([name.removeprefix("client_conv_"), dtype, channels, kernel.warps, kernel.registers,
                         kernel.spilled_bytes, kernel.shared_bytes, programs, programs * kernel.warps])
    text = (f"### The Triton convolution's programs compiled for sm_{args.capability} without a GPU "
            f"(Triton {triton.__version__})\n\n"
            + table(["kernel", "dtype", "channels", "warps a program", "registers a thread", "bytes spilled a thread",
                     "shared bytes", "programs an SM holds", "warps an SM holds"], rows) + "\n")
    print(text, flush=True)
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
