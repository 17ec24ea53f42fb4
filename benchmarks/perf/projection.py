"""(h) The projected time of a whole grid, from a stage of grid cells run at once on this machine.

    python benchmarks/perf/projection.py RUNS --grid benchmarks/paper.yaml [--since UNIX_SECONDS]

RUNS is a grid's output folder (``RUNS/cells/*/metrics.jsonl``) whose cells all ran at
once for the stage measured: ``gpu_session.sh``'s stage 2 runs the six Fashion-MNIST
paper cells as six processes, or packed K to a process (``--cells-per-process``). Every
round's record carries the wall-clock time it ended (``ended_at``); the stage's records
are those that ended after ``--since`` (default: all that carry the time). Then:

- warm: the moment every cell had ended its first round of the stage (processes started,
  data loaded, graphs compiled: all that a process pays once);
- throughput: the rounds (of all cells) that ended after that moment, over the time from
  it to the last round's end: cell-rounds per second of this machine, at this load, with
  this mix of cells (packed cells' rounds included: a pack's round ends each of its
  cells' rounds);
- start-up: the largest, over the cells, of a cell's first round's time (``time.round``)
  less its median round time: what a wave of processes pays once, compiling included,
  imports and data loading not;
- projected: the target grid's cells x rounds / throughput, plus one start-up per wave
  of as many cells as were measured (ceil(target cells / measured cells) waves); and
  with the first wave's start-up only: torch keeps compiled graphs in on-disk caches, so a
  later process compiling the same graphs mostly loads them (on this project's CPU a
  compiled cell's first round took 74 s in a fresh cache, 9 s in a second process; about
  2 s for a later round).

The projection assumes the target's cells cost what the measured mix costs per round
(the table says how many of each defense each holds: SDFC's rounds cost about twice a
FedAvg round's on the H200, so a measured mix with more SDFC cells than the target
projects on the high side) and that the target runs as waves of the measured
configuration. Numbers of a stage whose cells did not all run throughout (more cells than
``--jobs``, or cells that finished early) mean less: the script says how many cells it
counted and when each warmed.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[2]))
from common import machine, table  # noqa: E402

from fedbench.cells import CELLS  # noqa: E402
from fedbench.grid import load_grid  # noqa: E402
from fedbench.results import METRICS, read_jsonl  # noqa: E402

DEFAULT_ROUNDS = 50  # FederationConfig's default, for grid cells that do not set federation.rounds


@dataclass
class CellStage:
    """One cell's rounds in the stage: end times (Unix seconds) and round times (seconds)."""

    name: str
    defense: str
    ended_at: list[float]
    round_seconds: list[float]

    @property
    def startup(self) -> float:
        """First round's time less the median of the others' (0 with one round)."""
        rest = self.round_seconds[1:]
        return self.round_seconds[0] - statistics.median(rest) if rest else 0.0


@dataclass
class Projection:
    cells: int
    warm_at: float
    ended_at: float
    rounds_after_warm: int
    startup: float

    @property
    def throughput(self) -> float:
        """Cell-rounds per second after every cell was warm."""
        return self.rounds_after_warm / (self.ended_at - self.warm_at)

    def seconds_for(self, target_cells: int, target_rounds: int, cached: bool = False) -> float:
        """Every wave paying the start-up, or (``cached``) only the first: the later waves'
        processes find the compiled graphs in torch's on-disk caches (the start-up they
        still pay, tracing and loading, is not measured here and counts as none)."""
        waves = 1 if cached else math.ceil(target_cells / self.cells)
        return target_cells * target_rounds / self.throughput + waves * self.startup


def read_stage(runs: Path, since: float | None = None) -> list[CellStage]:
    """Each cell's records of the stage (ended after ``since``), in end-time order."""
    stages = []
    for cell_dir in sorted((runs / CELLS).iterdir()):
        records = [r for r in read_jsonl(cell_dir / METRICS)
                   if r.get("ended_at") is not None and (since is None or r["ended_at"] > since)]
        records.sort(key=lambda r: r["ended_at"])
        if records:
            defense = defense_of(cell_dir)
            stages.append(CellStage(cell_dir.name, defense, [r["ended_at"] for r in records],
                                    [r["time"]["round"] for r in records]))
    return stages


def defense_of(cell_dir: Path) -> str:
    import yaml

    config_path = cell_dir / "config.yaml"
    config = yaml.safe_load(config_path.read_text()) if config_path.exists() else {}
    return defense_name(config.get("defense"))


def defense_name(choice: object) -> str:
    """A config's defense as its registry name: a name, or ``{class_path: ..., init_args: ...}``
    (a class not in the registry: its class path)."""
    if not isinstance(choice, dict):
        return str(choice)
    from defenses import DEFENSES

    path = str(choice.get("class_path"))
    try:
        return DEFENSES.name_of(DEFENSES.resolve(path)) or path
    except (KeyError, ImportError):
        return path


def project(stages: list[CellStage]) -> Projection:
    """Throughput after every cell's first round, and the start-up a wave pays."""
    if not stages:
        raise SystemExit("no round records with an end time (ended_at) in this folder and window")
    warm_at = max(stage.ended_at[0] for stage in stages)
    ended_at = max(stage.ended_at[-1] for stage in stages)
    after = sum(1 for stage in stages for t in stage.ended_at if t > warm_at)
    if after == 0 or ended_at <= warm_at:
        raise SystemExit("no round ended after every cell's first round: run the stage longer")
    return Projection(len(stages), warm_at, ended_at, after, max(stage.startup for stage in stages))


def target_of(grid_file: str) -> tuple[int, int, dict[str, int]]:
    """The target grid's cells, rounds per cell (the largest) and cells per defense."""
    grid = load_grid(grid_file)
    rounds = max((cell.config.get("federation") or {}).get("rounds", DEFAULT_ROUNDS) for cell in grid.cells)
    return len(grid.cells), rounds, mix([defense_name(cell.config.get("defense")) for cell in grid.cells])


def mix(defenses: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name in defenses:
        counts[name] = counts.get(name, 0) + 1
    return counts


def report(stages: list[CellStage], projection: Projection, grid_file: str) -> str:
    cells, rounds, target_mix = target_of(grid_file)
    start = min(stage.ended_at[0] for stage in stages)
    rows = [[s.name, len(s.ended_at), round(s.ended_at[0] - start, 1), round(s.round_seconds[0], 1),
             round(statistics.median(s.round_seconds[1:]), 1) if len(s.round_seconds) > 1 else "-",
             round(s.startup, 1)] for s in stages]
    seconds, cached = projection.seconds_for(cells, rounds), projection.seconds_for(cells, rounds, cached=True)
    measured_mix = mix([s.defense for s in stages])
    return (f"### Projected grid time, {machine()}\n\n"
            + table(["cell", "rounds in the stage", "first round ended at (s after the first)", "first round (s)",
                     "median round (s)", "start-up (s)"], rows)
            + f"\n\nWarm after {projection.warm_at - start:.1f} s; then {projection.rounds_after_warm} cell-rounds in "
            f"{projection.ended_at - projection.warm_at:.1f} s: {projection.throughput * 3600:.0f} cell-rounds per hour "
            f"({len(stages)} cells at once; start-up {projection.startup:.1f} s per wave).\n"
            f"Measured mix: {fmt_mix(measured_mix)}. Target `{grid_file}`: {cells} cells x {rounds} rounds, "
            f"{fmt_mix(target_mix)}.\n"
            f"Projected: {seconds / 3600:.2f} hours ({cells * rounds} cell-rounds / throughput + "
            f"{math.ceil(cells / len(stages))} waves x start-up); {cached / 3600:.2f} hours if only the first wave "
            "compiles (the others load the graphs from torch's caches).\n")


def fmt_mix(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {count}" for name, count in sorted(counts.items()))


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, help="a grid's output folder, its cells run at once")
    parser.add_argument("--grid", default="benchmarks/paper.yaml", help="the grid file to project (default: make bench's)")
    parser.add_argument("--since", type=float, default=None, help="only rounds that ended after this Unix time")
    args = parser.parse_args(argv)
    stages = read_stage(args.runs, args.since)
    text = report(stages, project(stages), args.grid)
    print(text, flush=True)
    return text


if __name__ == "__main__":
    main()
