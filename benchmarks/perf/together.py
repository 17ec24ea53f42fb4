"""(f) Cross-cell cohorts: N cells' round-0 clients trained as one cohort
(``fedbench.together.train_together``), N = 1, 2, 4 by default (``--cells``): launches
per step for all N cells and per cell, and samples/s.

The papers' setting as in ``cohort.py`` (10 clients per cell, batch 64, simple_cnn;
``--attack pixel_pattern``: 3 poisoning clients per cell; ``--compile MODE``: the cohort
compiled, compiling on a throwaway round first); ``--steps`` local steps per client.
Launches as in ``cohort.py`` (CUDA kernels on a GPU; the innermost computing aten ops on
CPU, a ``_foreach`` op once). "Per step" is the round at 2 x steps minus the round at
steps, over steps: what one more step of every client of the N cells costs. The cohort
feed gathers, augments and poisons every client's batch in a fixed number of operations,
so it stays flat in N and the launches per cell-step fall as 1/N.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from cohort import Workload, best_seconds, kernels_of, make_run  # noqa: E402
from common import count_cuda_graph_recordings, cuda_graph_note, machine, table  # noqa: E402

from fedbench.engine import FederatedRun  # noqa: E402
from fedbench.together import train_together  # noqa: E402


def make_runs(cells: int, steps: int, device: str, out: Path, workload: Workload) -> list[FederatedRun]:
    # the cells are alike (seed 0, the workload's attack and defense): a step's launches do not depend on the seed
    return [make_run("simple_cnn", True, steps, "32-true", device, out / f"cell{i}", workload) for i in range(cells)]


def train_round(runs: list[FederatedRun]) -> None:
    train_together(runs, [run.open_round(0) for run in runs])


def measure_row(cells: int, steps: int, repeat: int, device: str, out: Path, workload: Workload) -> list:
    if workload.compile:  # compile every shape on a throwaway round: the counted ones start compiled
        train_round(make_runs(cells, steps, device, out, workload))
    runs = make_runs(cells, steps, device, out, workload)
    cuda = runs[0].device.type == "cuda"
    per_round = kernels_of(lambda: train_round(runs), cuda)
    longer_runs = make_runs(cells, 2 * steps, device, out, workload)
    longer = kernels_of(lambda: train_round(longer_runs), cuda)
    per_step = (longer - per_round) / steps
    samples = cells * 10 * steps * runs[0].exp.train.batch_size
    return [cells, 10 * cells, per_round, round(per_step), round(per_step / cells),
            round(samples / best_seconds(lambda: train_round(runs), repeat, cuda))]


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cells", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--defense", default="fedavg")
    parser.add_argument("--train-subset", type=int, default=None, help="clients' pool size (default: all)")
    parser.add_argument("--attack", default="none", help="e.g. pixel_pattern: 3 of each cell's 10 clients poison")
    parser.add_argument("--compile", default=None, help="the cohort's train.compile mode, e.g. default")
    args = parser.parse_args(argv)
    workload = Workload(args.defense, args.train_subset, args.compile, args.attack)
    if args.compile == "reduce-overhead" and torch.cuda.is_available():
        count_cuda_graph_recordings()
    if args.compile:
        import torch._inductor.config as inductor_config

        inductor_config.cpp.enable_kernel_profile = True  # CPU: each fused kernel shows in the profiler
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for cells in args.cells:
            rows.append(measure_row(cells, args.steps, args.repeat, args.device, Path(out), workload))
            print("| " + " | ".join(map(str, rows[-1])) + " |", file=sys.stderr, flush=True)
    kind = "CUDA kernels" if torch.cuda.is_available() and args.device != "cpu" else "aten ops (CPU)"
    label = workload.label("simple_cnn")
    text = (f"### Cross-cell cohorts: N cells' round trained as one cohort, {label}, 10 clients x "
            f"{args.steps} steps of 64 per cell, {machine()}\n\n"
            + table(["cells", "clients in the cohort", f"{kind} per round", "per step, all cells",
                     "per step, per cell", "samples/s"], rows) + cuda_graph_note(args.compile))
    print(text, flush=True)
    return text


if __name__ == "__main__":
    main()
