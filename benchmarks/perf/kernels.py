"""(j) Where a packed, compiled round's device time goes, and what the settings that could
change it do.

On an H100 the full grid's cells, 16 per process and compiled (``reduce-overhead``), kept
nvidia-smi's "busy" at 89-100% while training about 2.1 TFLOPS, 3% of its FP32 peak
(`benchmarks/perf/README.md`): what the GPU spends that time on is not measured there. This
builds N cells (``--cells``, default 16) of the paper's setting (simple_cnn, 10 clients
each, batch 64, ``--attack``: its clients poison), trains their round-0 clients as one
cohort (``fedbench.together``), compiled in ``--compile``, and for each variant
(``--variants``) at each N given (``--cells 16 64``: whether more clients per step raise
samples/s; cuDNN's grouped convolution launches once per client, so its kernels grow with
the cells, where triton's launches do not):

- ``base``: the grid's settings (fp32, ``train.channels_last=true``, float32 matrix
  products in full precision);
- ``tf32``: ``fabric.tf32=all`` (matrix products on TF32 tensor cores too; cuDNN's
  convolutions use them by default);
- ``conv_fp32``: ``fabric.tf32=none`` (cuDNN's convolutions in full float32: on the H100
  its TF32 tensor-op kernels ran one launch per client and converted each client's slice
  between layouts, at least 2,570 kernels a step; its float32 kernels may not);
- ``bf16``: ``fabric.precision=bf16-mixed``;
- ``matmul``: the grid's settings with ``train.cohort_convolution=matmul``: simple_cnn's
  convolutions computed as matrix products over unfolded patches (under vmap, one batched
  matrix product with every client's weights instead of a grouped convolution;
  ``fedbench.matmul_conv``);
- ``matmul_tf32``: ``matmul`` with ``fabric.tf32=all`` (on a GPU base's cuDNN convolutions
  run in TF32 by default, ``matmul``'s products in full float32: this one compares like
  with like, its linear layers in TF32 too);
- ``triton``: the grid's settings with ``train.cohort_convolution=triton``: every client's
  convolution one Triton kernel launch, forward, input gradient and weight gradient
  (``fedbench.client_conv``; full float32; the fused step differentiating by autograd);
- ``cudnn_benchmark``: ``torch.backends.cudnn.benchmark=True`` (cuDNN times its algorithms
  on the first call and keeps the fastest; no training option: a run sets it off, since
  the choice can differ from run to run and with it the float rounding);

each in a process of its own, and prints, per variant:

- samples/s per step and ms per step: from a round of ``--steps`` steps and one of twice
  as many (best of ``--repeat`` after a round that compiles, each round 0 of the same runs
  again), the second's extra steps over their time. A paper round is about 840 steps per
  client, so this is what the grid's training sees; a short round's samples/s (also
  printed) include the round's fixed part, printed too (choosing clients, copying models,
  stacking, updates). On the H100 of 2026-11-27 the grid's settings trained 487,551
  samples/s in rounds of 10 steps and 791,575 in rounds of 100: 850k a step.
- one profiled round's kernels grouped by name and ranked by their summed device time,
  with each group's kind (inductor's fused kernel, convolution, matrix product, other), the
  share of each kind, and kernels per step. On a GPU: CUDA kernels and their device time
  (kernels replayed by a CUDA graph included). On that H100 a round of 100 steps summed
  2,565 ms of kernel time profiled against 1,294 ms of wall time unprofiled (kernels
  slowed by the profiler, or overlapping on several streams: not told apart), so compare
  the shares and counts, not the milliseconds with the wall time. On CPU (a dry run): the
  aten ops that compute and their own CPU time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from cohort import Workload, best_seconds, make_run  # noqa: E402
from common import in_fresh_process, machine, table  # noqa: E402
from together import train_round  # noqa: E402

from fedbench.engine import FederatedRun  # noqa: E402

VARIANTS = ("base", "tf32", "conv_fp32", "cudnn_benchmark", "bf16", "matmul", "matmul_tf32", "triton")
# the variants that are a train.cohort_convolution, with everything else as the grid's settings
CONVOLUTION_VARIANTS = {"matmul": "matmul", "triton": "triton"}
# First match wins: inductor names a fused kernel after the ops around it
# (triton_poi_fused_convolution_backward_0), so fused kernels come first.
# cuDNN's convolutions (implicit GEMM, FFT) before the matrix products: their names may say
# gemm or cutlass too; cuBLAS's own (sm90_xmma_gemm, nvjet, gemv, split-K) are matrix products.
KINDS = (("inductor fused", ("triton", "cpp_fused")),
         ("convolution", ("conv", "cudnn", "implicit", "wgrad", "dgrad", "fprop", "fft2d", "flip_filter",
                          "im2col", "col2im")),  # the matmul variant's patches count as its convolutions' work
         ("matrix product", ("gemm", "nvjet", "gemv", "splitkreduce", "cutlass", "matmul", "bmm", "addmm",
                             "aten::mm")))


@dataclasses.dataclass(frozen=True)
class KernelGroup:
    name: str
    calls: int
    microseconds: float

    @property
    def kind(self) -> str:
        return kind_of(self.name)


def kind_of(name: str) -> str:
    """The kernel's kind from its name: the first of :data:`KINDS` whose word it holds."""
    lowered = name.lower()
    for kind, words in KINDS:
        if any(word in lowered for word in words):
            return kind
    return "other"


def grouped(events: list[tuple[str, float]]) -> list[KernelGroup]:
    """(name, microseconds) events summed per name, the longest first."""
    calls: dict[str, int] = defaultdict(int)
    total: dict[str, float] = defaultdict(float)
    for name, microseconds in events:
        calls[name] += 1
        total[name] += microseconds
    return sorted((KernelGroup(n, calls[n], total[n]) for n in calls), key=lambda g: -g.microseconds)


def kind_shares(groups: list[KernelGroup]) -> dict[str, float]:
    """Each kind's share of all the groups' time, in percent."""
    total = sum(g.microseconds for g in groups) or 1.0
    shares: dict[str, float] = defaultdict(float)
    for group in groups:
        shares[group.kind] += 100 * group.microseconds / total
    return dict(shares)


def profiled_events(work, cuda: bool) -> list[tuple[str, float]]:
    """(name, microseconds) of what ``work()`` computes: its CUDA kernels on a GPU, else the
    aten ops (and inductor's fused CPU kernels) with their own CPU time."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        work()
        if cuda:
            torch.cuda.synchronize()
    if cuda:
        return [(e.name, e.time_range.elapsed_us()) for e in prof.events()
                if e.device_type == torch.autograd.DeviceType.CUDA]
    return [(e.name, e.self_cpu_time_total) for e in prof.events()
            if e.name.startswith("aten::") or "cpp_fused" in e.name]


# fabric.tf32 of each variant: which float32 work runs on TF32 tensor cores (the grid's: convolutions)
TF32 = {"tf32": "all", "matmul_tf32": "all", "conv_fp32": "none"}


def make_runs(variant: str, cells: int, steps: int, device: str, out: Path, workload: Workload) -> list[FederatedRun]:
    """The variant's runs. Build them right before measuring them: a run sets torch's
    process-wide TF32 switches (``fabric.tf32``) as it starts."""
    precision = "bf16-mixed" if variant == "bf16" else "32-true"
    options = {"cohort_convolution": {"matmul_tf32": "matmul", **CONVOLUTION_VARIANTS}.get(variant, "grouped")}
    return [make_run("simple_cnn", True, steps, precision, device, out / f"{variant}{i}_{steps}", workload, options,
                     {"tf32": TF32.get(variant, "convolutions")}) for i in range(cells)]


@contextmanager
def autotuned(variant: str) -> Iterator[None]:
    """cuDNN's autotuner on for ``cudnn_benchmark`` (a run sets it off as it starts, since
    its choice can differ from run to run and with it the float rounding), put back after."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = variant == "cudnn_benchmark"
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def set_local_steps(runs: list[FederatedRun], steps: int) -> None:
    """Each run's next rounds take ``steps`` local steps: the long round reuses the short
    round's runs and compiled graphs (a second set of 64 cells took about a minute to build
    on this project's CPU), since a run reads ``train.local_steps`` as each round opens."""
    for run in runs:
        run.exp.train.local_steps = steps


def per_step(short_seconds: float, long_seconds: float, steps: int) -> tuple[float, float]:
    """(seconds per step, seconds per round besides its steps) from a round of ``steps``
    steps and one of ``2 * steps``: the second round's extra steps are all it adds."""
    step = (long_seconds - short_seconds) / steps
    return step, short_seconds - steps * step


def measure_apart(variant: str, cells: int, args, out: Path, workload: Workload) -> tuple[list, str]:
    """:func:`measure` in a process of its own (:func:`common.in_fresh_process`): a variant
    run after another would find cuDNN's plans and the compiled graphs (CUDA graphs
    recorded under the other's switches) that the other left."""
    return in_fresh_process(measure, variant, cells, args, out, workload)


def measure(variant: str, cells: int, args, out: Path, workload: Workload) -> tuple[list, str]:
    """The variant's row for ``cells`` cells (samples/s per step and per short round, the
    round's fixed part, the profiled round's kernels, kinds' shares) and its table of the
    ``args.top`` kernel groups."""
    if workload.compile:
        import torch._inductor.config as inductor_config

        inductor_config.cpp.enable_kernel_profile = True  # CPU: each fused kernel shows in the profiler
    runs = make_runs(variant, cells, args.steps, args.device, out, workload)
    cuda = runs[0].device.type == "cuda"
    step_samples = cells * 10 * runs[0].exp.train.batch_size

    def round_of(steps: int) -> None:
        set_local_steps(runs, steps)
        train_round(runs)

    with autotuned(variant):
        # round 0 again each time; best_seconds' warm-up round compiles (and records the CUDA graphs)
        short = best_seconds(lambda: round_of(args.steps), args.repeat, cuda)
        long = best_seconds(lambda: round_of(2 * args.steps), args.repeat, cuda)
        groups = grouped(profiled_events(lambda: round_of(args.steps), cuda))
    step, fixed = per_step(short, long, args.steps)
    shares = kind_shares(groups)
    total_ms = sum(g.microseconds for g in groups) / 1000
    row = [variant, cells, round(step_samples / step), round(1000 * step, 2), round(1000 * fixed),
           round(step_samples * args.steps / short), round(sum(g.calls for g in groups) / args.steps),
           round(total_ms, 1)] + [round(shares.get(k, 0.0), 1) for k in [k for k, _ in KINDS] + ["other"]]
    rows = [[g.name[:90], g.kind, g.calls, round(g.microseconds / 1000, 2),
             round(100 * g.microseconds / (1000 * total_ms or 1), 1)] for g in groups[:args.top]]
    heading = f"#### {variant}, {cells} cells: the {args.top} longest kernel groups of one round\n\n"
    return row, heading + table(["kernel", "kind", "calls", "ms", "% of the round's kernel time"], rows)


# best-of-2 rounds of one call: a smaller lead than this could be noise
CONVOLUTION_LEAD = 1.05


def faster_convolution(samples_per_second: dict[str, float]) -> str:
    """``train.cohort_convolution`` for a grid: of the measured convolution variants
    (``matmul``, ``triton``), the one that trained the most samples/s, where it trained at
    least 5% more than ``base`` (the grid's settings) did; otherwise (or base not measured)
    ``grouped``. On a GPU base's cuDNN convolutions run in TF32 (torch's default), matmul's
    and triton's in full float32: a lead of theirs holds despite that."""
    base = samples_per_second.get("base")
    measured = {option: samples_per_second[v] for v, option in CONVOLUTION_VARIANTS.items() if v in samples_per_second}
    if base is None or not measured:
        return "grouped"
    option = max(measured, key=measured.get)
    return option if measured[option] >= CONVOLUTION_LEAD * base else "grouped"


# a larger pack only where its cells train this many times the samples/s of the first count's
PACK_GAIN = 1.5
PLANNED_PACKS = (16, 32)  # cells per process in the lease's grid call: 2 processes of 16, or of 32


def grid_plan(samples_per_second: dict[str, float], larger_cells: int = 64) -> tuple[str, int]:
    """The lease's grid call, from its first call's ``--json`` (``--cells 16 64``): the
    convolution (:func:`faster_convolution`) and the cells per process, 32 (two processes:
    the 64 cells at once that were measured in one) where that convolution's variant
    trained at least 1.5 times the samples/s at 64 cells that it trained at 16, else 16."""
    convolution = faster_convolution(samples_per_second)
    variant = next((v for v, option in CONVOLUTION_VARIANTS.items() if option == convolution), "base")
    first, larger = samples_per_second.get(variant), samples_per_second.get(f"{variant}@{larger_cells}")
    gains = first is not None and larger is not None and larger >= PACK_GAIN * first
    return convolution, PLANNED_PACKS[1] if gains else PLANNED_PACKS[0]


def json_key(variant: str, cells: int, first_cells: int) -> str:
    """The variant's key in ``--json``: its name at the first ``--cells`` (what
    :func:`faster_convolution` compares), ``variant@cells`` at the others."""
    return variant if cells == first_cells else f"{variant}@{cells}"


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, nargs="+", default=[16],
                        help="cells per packed round; several: every variant at each, in this order")
    parser.add_argument("--steps", type=int, default=20,
                        help="local steps per client in the short round (the long one: twice as many)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--attack", default="pixel_pattern")
    parser.add_argument("--compile", default="reduce-overhead", help="train.compile; 'none' for eager")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--top", type=int, default=12, help="kernel groups listed per variant")
    parser.add_argument("--json", type=Path, help="write {variant: samples/s} here, after each variant")
    parser.add_argument("--faster-convolution", type=Path, metavar="JSON",
                        help="measure nothing: print the train.cohort_convolution that an earlier --json "
                             "file found faster (matmul, triton or grouped)")
    parser.add_argument("--grid-plan", type=Path, metavar="JSON",
                        help="measure nothing: print the lease's grid call that an earlier --json file "
                             "(--cells 16 64) calls for: its convolution and cells per process (grid_plan)")
    args = parser.parse_args(argv)
    if args.grid_plan:
        plan = grid_plan(json.loads(args.grid_plan.read_text()))
        print(*plan)
        return " ".join(map(str, plan))
    if args.faster_convolution:
        choice = faster_convolution(json.loads(args.faster_convolution.read_text()))
        print(choice)
        return choice
    workload = Workload("fedavg", None, None if args.compile == "none" else args.compile, args.attack)
    rows, tables, measured = [], [], {}
    with tempfile.TemporaryDirectory() as out:
        for cells in args.cells:
            for variant in args.variants:
                row, kernels = measure_apart(variant, cells, args, Path(out), workload)
                rows.append(row)
                tables.append(kernels)
                measured[json_key(variant, cells, args.cells[0])] = row[2]
                if args.json:
                    args.json.write_text(json.dumps(measured))
                # each variant as soon as it is measured: a run stopped at its time limit keeps them
                print("| " + " | ".join(map(str, row)) + " |\n\n" + kernels + "\n", flush=True)
    unit = "CUDA kernel" if torch.cuda.is_available() and args.device != "cpu" else "aten op (CPU)"
    counts = " or ".join(map(str, args.cells))
    text = (f"### Where a packed round's {unit} time goes: {counts} cells x 10 clients x {args.steps} steps of 64, "
            f"{workload.label('simple_cnn')}, {machine()}\n\n"
            + table(["variant", "cells", "samples/s per step", "ms per step", "ms per round besides its steps",
                     f"samples/s in rounds of {args.steps} steps", f"{unit}s per step (the profiled round's over its steps)",
                     f"{unit} ms in the profiled round"] + [f"% {k}" for k, _ in KINDS] + ["% other"], rows)
            + "\n\n" + "\n\n".join(tables) + "\n")
    print(text, flush=True)
    return text


if __name__ == "__main__":
    main()
