"""(g) FLTrust's server update: trained alone at aggregation vs as one more row of the cohort.

Each round FLTrust trains the global model on its root set for the clients' median number
of local steps (815 at the papers' protocol, seed 0): alone, one step at a time, that is
as many steps as a median client's whole training, after the clients are done. In a
cohort the engine trains it as one more row of the clients' cohort
(``FederatedRun.server_job``). Counted and timed here on one FLTrust round (Fashion-MNIST,
10 clients, 3 with the pixel pattern, simple_cnn, ``--steps`` local steps per client, so
the server trains as many; the round's evaluation left out):

- sequential: the clients one by one, then the server;
- cohort, server alone: the clients' cohort, then the server one step at a time (the
  engine before 2026-11-27);
- cohort, server as a row: the server trains with the clients.

Launches counted as in ``cohort.py`` (CPU: aten ops that would launch a kernel; GPU: CUDA
kernels), per round and per further step (the round at 2 x ``--steps`` minus the round at
``--steps``, over ``--steps``); the server update g0 of each way against sequential's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).parent))
from cohort import Workload, best_seconds, kernels_of, make_run  # noqa: E402
from common import machine, table  # noqa: E402

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from fedbench.engine import FederatedRun  # noqa: E402

WAYS = {"sequential": (False, True), "cohort, server alone": (True, False), "cohort, server as a row": (True, True)}


def fltrust_round(way: str, steps: int, device: str, out: Path, compile_mode: str | None) -> tuple[FederatedRun, list]:
    """A run whose ``run_round(0)`` is one FLTrust round of ``way``, unevaluated, and the
    list where its server updates land."""
    cohort, server_row = WAYS[way]
    run = make_run("simple_cnn", cohort, steps, "32-true", device, out,
                   Workload("fltrust", None, compile_mode, "pixel_pattern"))
    run._evaluate_this_round = lambda round_index: False
    if not server_row:
        run.server_job = lambda clients: None
    made: list[Tensor] = []
    server_train = run.exp.defense.env.server_train

    def recording(*args) -> Tensor:
        made.append(server_train(*args))
        return made[-1]

    run.exp.defense.env.server_train = recording
    return run, made


def way_row(way: str, steps: int, device: str, out: Path, compile_mode: str | None, repeat: int,
            reference: Tensor | None) -> tuple[list, Tensor]:
    if compile_mode:  # compile on a throwaway run, whose graphs serve the runs measured next
        throwaway, _ = fltrust_round(way, steps, device, out, compile_mode)
        throwaway.run_round(0)
    run, made = fltrust_round(way, steps, device, out, compile_mode)
    cuda = run.device.type == "cuda"
    launched = kernels_of(lambda: run.run_round(0), cuda)
    g0 = made[-1].double()
    longer, _ = fltrust_round(way, 2 * steps, device, out, compile_mode)
    per_step = (kernels_of(lambda: longer.run_round(0), cuda) - launched) / steps
    round_once: Callable[[], object] = lambda: run.run_round(0)  # noqa: E731
    seconds = best_seconds(round_once, repeat, cuda)
    reference = g0 if reference is None else reference
    gap = float((g0 - reference).norm() / reference.norm())
    return [way, launched, round(per_step), round(seconds, 2), f"{gap:.1e}"], reference


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", default=None, help="the cohort's train.compile mode, e.g. default")
    args = parser.parse_args(argv)
    rows, reference = [], None
    with tempfile.TemporaryDirectory() as out:
        for way in WAYS:
            row, reference = way_row(way, args.steps, args.device, Path(out), args.compile, args.repeat, reference)
            rows.append(row)
            print("| " + " | ".join(map(str, row)) + " |", file=sys.stderr, flush=True)
    kind = "CUDA kernels" if torch.cuda.is_available() and args.device != "cpu" else "aten ops (CPU)"
    compiled = f", cohort compiled ({args.compile})" if args.compile else ""
    text = (f"### One FLTrust round, 10 clients and the server, {args.steps} steps each{compiled}, {machine()}\n\n"
            + table(["training", f"{kind} per round", "per further step", "seconds", "g0's relative gap"], rows))
    print(text, flush=True)
    return text


if __name__ == "__main__":
    main()
