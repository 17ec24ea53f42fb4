"""Triton kernels of a convolution whose weights differ per client, for every client at once.

Shapes: inputs ``x[K, N, C, H, W]``, weights ``w[K, O, C, KH, KW]``, bias ``b[K, O]``,
outputs ``y[K, N, O, OH, OW]`` (all contiguous), with client ``k``'s images convolved by
client ``k``'s weights only:

    y[k, n, o, oh, ow] = b[k, o] + sum_{c, i, j} w[k, o, c, i, j] * x[k, n, c, oh*sh - ph + i*dh, ow*sw - pw + j*dw]

(zero padding: taps outside the image read 0). The two backward kernels are the same sum
read the other way round:

    dx[k, n, c, ih, iw] = sum_{o, i, j} dy[k, n, o, oh, ow] * w[k, o, c, i, j]
                          over the (oh, ow) with oh*sh = ih + ph - i*dh and ow*sw = iw + pw - j*dw
    dw[k, o, c, i, j]   = sum_{n, oh, ow} dy[k, n, o, oh, ow] * x[k, n, c, oh*sh - ph + i*dh, ow*sw - pw + j*dw]

Each kernel is one launch for all K clients (cuDNN's grouped convolution, which ``vmap``
makes of such a convolution, launches once per client on an H100: ``benchmarks/perf/
kernels.py``). Every product is in float32 (no TF32: fused multiply-adds, and the
weight gradient's matrix products with ``input_precision="ieee"``), summed in a fixed
order (forward: kernel rows, columns, then input channels; input gradient: kernel rows,
columns, then output channels, whatever the blocks; weight gradient: blocks of positions,
then its shares, fixed by its block sizes): the same inputs on the same device give the
same bits.
Inputs may be float32, bfloat16 or float16; sums are float32, stored in the output's dtype.

Under ``TRITON_INTERPRET=1`` (set before Triton is imported) they run in Triton's
interpreter, on CPU tensors (numpy, slow: for checking only).
"""

from __future__ import annotations

from dataclasses import dataclass

import triton
import triton.language as tl

WARPS = 4  # a program's warps on a GPU (the interpreter has none)
# The weight gradient's programs: with 8 warps ptxas gives a thread 105 registers (189 with
# 4), so an SM holds twice the warps. The warps should not change a sum: Triton's float32
# dot without tensor cores adds each product of a block in the positions' order in one
# thread (not checked on a GPU: its test repeats one setting)
WEIGHT_GRAD_WARPS = 8
MAX_BLOCK = 2**20  # Triton's largest block, in values (triton._utils.TRITON_MAX_TENSOR_NUMEL in 3.8.0)
CHANNELS_PER_PROGRAM = 8  # the forward pass's output channels a program computes on a GPU


def output_channels_per_program(device_type: str, channels: int) -> int:
    """The forward pass's output channels a program computes, of a layer's ``channels``: on
    a GPU at most ``CHANNELS_PER_PROGRAM``, in the interpreter all of them (fewer programs).
    On a GPU a thread loads, for each tap and input channel, every weight of its program's
    output channels and an input value for each of its positions: at 8 channels and 512
    positions 12 loads feed its 32 multiply-adds, 141 registers a thread (ptxas for an
    H100); a program of 64 channels and 128 positions made ptxas spill its sums to local
    memory (18,784 bytes a thread), one of 16 channels and 256 positions needs 18 loads
    and 245 registers. Wider layers take several programs, each reading the same inputs."""
    return min(block(channels), CHANNELS_PER_PROGRAM) if device_type == "cuda" else block(channels)


def positions_per_program(device_type: str, channels: int, positions: int = 16384) -> int:
    """Positions (output positions; input positions for dx) a program computes for
    ``channels`` channels a program (the forward pass's output channels, dx's input
    channels), of a client's ``positions``. On a GPU the accumulator stays in registers
    (4,096 sums a program, 32 a thread, up to 32 channels; 8,192 at dx's widest, 64) and each
    thread reuses a tap's weights for several positions: 512 positions for up to 8
    channels, down to 128 (64 channels). In the interpreter, which runs programs one after
    another in Python over whole blocks, masked positions included, a block of all the
    client's positions, at most 16,384 (fewer programs and loop turns). A position's sum is
    the same whatever the block."""
    if device_type != "cuda":
        return min(16384, block(positions))
    return min(512, max(128, 4096 // block(channels)))


def warps_of(kernel) -> int:
    """A program's warps on a GPU for one of the three kernels."""
    return WEIGHT_GRAD_WARPS if kernel is client_conv_weight_grad else WARPS


@triton.jit
def block_positions(BLOCK_P: tl.constexpr, N, H, W):
    """This program's block of BLOCK_P positions (program 0) among one client's N images of
    H x W, numbered image by image: whether each is in range, its image, its position in
    the image, row and column."""
    r = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    n, p = r // (H * W), r % (H * W)
    return r < N * H * W, n, p, p // W, p % W


@triton.jit
def client_conv_forward(x, w, b, y, N, C, H, W, O, OH, OW, sh, sw, ph, pw, dh, dw,
                        KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr,
                        BLOCK_O: tl.constexpr, BLOCK_P: tl.constexpr):
    """One program: BLOCK_P of one client's output positions, its images' positions in a
    row (program 0), of client k (program 1), BLOCK_O of its output channels (program 2).
    Offsets inside a client are 32-bit (its tensors hold under 2**31 values: the operator
    checks)."""
    k = tl.program_id(1).to(tl.int64)
    x_client, y_client = x + k * N * C * H * W, y + k * N * O * OH * OW
    r_ok, n, p, oh, ow = block_positions(BLOCK_P, N, OH, OW)
    o = tl.program_id(2) * BLOCK_O + tl.arange(0, BLOCK_O)
    o_ok = o < O
    w_client = w + k * O * C * KH * KW + o * (C * KH * KW)
    x_image = x_client + n * C * H * W
    acc = tl.zeros((BLOCK_O, BLOCK_P), dtype=tl.float32)
    # taps outside, channels inside: a tap's offsets and mask serve every channel; the taps
    # in a loop, not unrolled, so the compiler does not keep every tap's offsets in registers
    # (ptxas for an H100: 141 registers a thread; channels outside, taps unrolled: 255 and
    # spills to local memory)
    for i in range(KH):
        ih = oh * sh - ph + i * dh
        row_ok = r_ok & (ih >= 0) & (ih < H)
        for j in range(KW):
            iw = ow * sw - pw + j * dw
            ok = row_ok & (iw >= 0) & (iw < W)
            x_tap, w_tap = x_image + ih * W + iw, w_client + i * KW + j
            for c in range(C):
                xv = tl.load(x_tap + c * H * W, mask=ok, other=0.0).to(tl.float32)
                wv = tl.load(w_tap + c * KH * KW, mask=o_ok, other=0.0).to(tl.float32)
                acc += wv[:, None] * xv[None, :]
    if HAS_BIAS:
        acc += tl.load(b + k * O + o, mask=o_ok, other=0.0).to(tl.float32)[:, None]
    out = y_client + (n[None, :] * O + o[:, None]) * (OH * OW) + p[None, :]
    tl.store(out, acc.to(y.dtype.element_ty), mask=o_ok[:, None] & r_ok[None, :])


@triton.jit
def client_conv_input_grad(dy, w, dx, N, C, H, W, O, OH, OW, sh, sw, ph, pw, dh, dw,
                           KH: tl.constexpr, KW: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """One program: BLOCK_P of one client's input positions (program 0), of client k
    (program 1), every input channel."""
    k = tl.program_id(1).to(tl.int64)
    dy_client, dx_client = dy + k * N * O * OH * OW, dx + k * N * C * H * W
    r_ok, n, q, ih, iw = block_positions(BLOCK_P, N, H, W)
    c = tl.arange(0, BLOCK_C)
    c_ok = c < C
    w_client = w + k * O * C * KH * KW + c * (KH * KW)
    dy_image = dy_client + n * O * OH * OW
    acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    # taps outside, channels inside: each tap's output position (integer divisions) once; the
    # taps in a loop, not unrolled (ptxas for an H100: 120 registers a thread, 203 unrolled)
    for i in range(KH):
        th = ih + ph - i * dh  # = oh * sh where output row oh reads this input row
        th_ok = th >= 0
        th = tl.where(th_ok, th, 0)  # no negative division: those rows are masked
        oh = th // sh
        row_ok = r_ok & th_ok & (th % sh == 0) & (oh < OH)
        for j in range(KW):
            tw = iw + pw - j * dw
            tw_ok = tw >= 0
            tw = tl.where(tw_ok, tw, 0)
            ow = tw // sw
            ok = row_ok & tw_ok & (tw % sw == 0) & (ow < OW)
            dy_tap = dy_image + oh * OW + ow
            for o in range(O):
                dyv = tl.load(dy_tap + o * OH * OW, mask=ok, other=0.0).to(tl.float32)
                wv = tl.load(w_client + o * (C * KH * KW) + i * KW + j, mask=c_ok, other=0.0).to(tl.float32)
                acc += wv[:, None] * dyv[None, :]
    out = dx_client + (n[None, :] * C + c[:, None]) * (H * W) + q[None, :]
    tl.store(out, acc.to(dx.dtype.element_ty), mask=c_ok[:, None] & r_ok[None, :])


@triton.jit
def client_conv_weight_grad(dy, x, partial, N, C, H, W, O, OH, OW, sh, sw, ph, pw, dh, dw, SPLITS,
                            KH: tl.constexpr, KW: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_T: tl.constexpr,
                            BLOCK_R: tl.constexpr):
    """One program: one client (program 0), BLOCK_T of its taps ``t = (c, i, j)`` (program
    1), one of SPLITS shares of its images' output positions (program 2), every output
    channel: ``partial[k, split, o, t] = sum_r dy[k, o, r] * patch[k, r, t]`` as float32
    matrix products (``input_precision="ieee"``: no TF32) over BLOCK_R positions at a time,
    so a block of dy is read once for BLOCK_T taps. The shares are summed afterwards."""
    k = tl.program_id(0).to(tl.int64)
    x_client, dy_client = x + k * N * C * H * W, dy + k * N * O * OH * OW
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    split = tl.program_id(2)
    t_ok = t < C * KH * KW
    c, i, j = t // (KH * KW), (t // KW) % KH, t % KW
    o = tl.arange(0, BLOCK_O)
    o_ok = o < O
    positions = N * OH * OW
    share = tl.cdiv(tl.cdiv(positions, SPLITS), BLOCK_R) * BLOCK_R
    acc = tl.zeros((BLOCK_O, BLOCK_T), dtype=tl.float32)
    for start in range(split * share, tl.minimum(positions, (split + 1) * share), BLOCK_R):
        r = start + tl.arange(0, BLOCK_R)
        r_ok = r < positions
        n, p = r // (OH * OW), r % (OH * OW)
        ih = ((p // OW) * sh - ph)[:, None] + (i * dh)[None, :]  # [BLOCK_R, BLOCK_T]
        iw = ((p % OW) * sw - pw)[:, None] + (j * dw)[None, :]
        ok = r_ok[:, None] & t_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        patch = tl.load(x_client + ((n[:, None] * C + c[None, :]) * H + ih) * W + iw, mask=ok, other=0.0)
        dyv = tl.load(dy_client + (n[None, :] * O + o[:, None]) * (OH * OW) + p[None, :],
                      mask=o_ok[:, None] & r_ok[None, :], other=0.0)
        acc += tl.dot(dyv.to(tl.float32), patch.to(tl.float32), input_precision="ieee")
    out = partial + ((k * SPLITS + split) * O + o[:, None]) * (C * KH * KW) + t[None, :]
    tl.store(out, acc, mask=o_ok[:, None] & t_ok[None, :])


@triton.jit
def interpreter_probe(out, turns):
    """``out[0] = turns``, counted in a loop over a scalar argument, as the kernels loop
    over channels: Triton 3.6.0's interpreter fails at such a loop, 3.8.0's runs it."""
    total = 0.0
    for _ in range(turns):
        total += 1.0
    tl.store(out, total)


def block(size: int, least: int = 2) -> int:
    """A power of two >= size (Triton's blocks are powers of two), at least ``least``
    (``tl.dot``'s operands are at least 16 a side)."""
    return max(least, triton.next_power_of_2(size))


def weight_grad_blocks(device_type: str, taps: int, positions: int, channels_out: int = 1) -> tuple[int, int, int]:
    """The weight gradient's taps and positions per program, and the shares of a client's
    positions summed apart (more programs at once; summed afterwards in a fixed order). On a
    GPU: 32 taps (one block of dy serves 32 taps' products), 64 positions at a time, a share
    at least 32 such blocks, at most 16 shares (from the client's positions alone, so a
    client's sums do not depend on how many clients train with it); in the interpreter
    every tap in one program, all the client's positions at a time (fewer loop turns, each
    an interpreted step) up to Triton's largest block, ``MAX_BLOCK`` values (positions x
    taps in the patch block, positions x ``channels_out`` in dy's), one share."""
    if device_type == "cuda":
        return 32, 64, min(16, max(1, positions // (64 * 32)))
    block_t = block(taps, least=16)
    widest = max(block_t, block(channels_out, least=16))
    return block_t, max(16, min(block(positions, least=16), MAX_BLOCK // widest)), 1


@dataclass(frozen=True)
class CompiledKernel:
    """A kernel as a GPU would run it: its PTX, and what ptxas gave each program."""

    ptx: str
    shared_bytes: int  # shared memory a program needs
    registers: int  # per thread
    spilled_bytes: int  # per thread, stored to local memory because the registers ran out
    warps: int  # a program's


def compiled_for_gpu(capability: int = 90, dtype: str = "fp32", channels: int = 6,
                     names: tuple[str, ...] | None = None) -> dict[str, CompiledKernel]:
    """Each kernel compiled ahead of time by Triton's own compiler (ptxas included) for a
    CUDA GPU of ``capability`` (90: H100), with tensors of ``dtype`` (``fp32``, ``bf16``),
    5x5 kernels and the GPU's block sizes for a layer of ``channels`` channels in and out
    (6: simple_cnn's first; the operator takes up to 64), by kernel name (of ``names``,
    default all three); registers and spills as ``ptxas -v`` reports them.
    Needs no GPU, but Triton's interpreter off (TRITON_INTERPRET unset before Triton is
    imported)."""
    import inspect

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    pointers = {client_conv_forward: dict.fromkeys(("x", "w", "b", "y"), f"*{dtype}"),
                client_conv_input_grad: dict.fromkeys(("dy", "w", "dx"), f"*{dtype}"),
                client_conv_weight_grad: {"dy": f"*{dtype}", "x": f"*{dtype}", "partial": "*fp32"}}
    block_o = output_channels_per_program("cuda", channels)
    constants = {client_conv_forward: dict(KH=5, KW=5, HAS_BIAS=True, BLOCK_O=block_o,
                                           BLOCK_P=positions_per_program("cuda", block_o)),
                 client_conv_input_grad: dict(KH=5, KW=5, BLOCK_C=block(channels),
                                              BLOCK_P=positions_per_program("cuda", channels)),
                 client_conv_weight_grad: dict(KH=5, KW=5, BLOCK_O=block(channels, least=16), BLOCK_T=32, BLOCK_R=64)}
    compiled_kernels = {}
    for kernel, fixed in constants.items():
        if names is not None and kernel.fn.__name__ not in names:
            continue
        signature = {name: "constexpr" if name in fixed else pointers[kernel].get(name, "i32")
                     for name in inspect.signature(kernel.fn).parameters}
        source = ASTSource(fn=kernel, signature=signature, constexprs=fixed)
        warps = warps_of(kernel)
        compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": warps})
        ptx = compiled.asm["ptx"]
        registers, spilled = ptxas_usage(ptx, capability)
        compiled_kernels[kernel.fn.__name__] = CompiledKernel(ptx, compiled.metadata.shared, registers, spilled, warps)
    return compiled_kernels


def ptxas_usage(ptx: str, capability: int) -> tuple[int, int]:
    """Registers a thread and bytes a thread spilled, as ``ptxas -v`` (Triton's own) reports
    compiling ``ptx`` for its target."""
    import re
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    arch = re.search(r"^\.target\s+(sm_\w+)", ptx, flags=re.M).group(1)
    with tempfile.TemporaryDirectory() as folder:
        source = f"{folder}/kernel.ptx"
        with open(source, "w") as file:
            file.write(ptx)
        done = subprocess.run([get_ptxas(capability).path, "-v", f"-arch={arch}", source, "-o", f"{folder}/kernel.o"],
                              capture_output=True, text=True)
    registers = re.findall(r"Used (\d+) registers", done.stderr)
    spilled = re.findall(r"(\d+) bytes spill stores", done.stderr)
    if done.returncode or len(registers) != 1 or len(spilled) != 1:  # one kernel, one function
        raise RuntimeError(f"ptxas -v (exit {done.returncode}) did not report one function's registers and "
                           f"spills: {done.stderr[-1000:]}")
    return int(registers[0]), int(spilled[0])
