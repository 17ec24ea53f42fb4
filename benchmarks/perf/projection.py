"""(h) The projected time of a whole grid, from a stage of grid cells run at once on this machine.

    python benchmarks/perf/projection.py RUNS --grid benchmarks/paper.yaml [--since UNIX_SECONDS]

RUNS is a grid's output folder (``RUNS/cells/*/metrics.jsonl``) whose cells all ran at
once for the stage measured: ``gpu_session.sh``'s stage 2 runs the six Fashion-MNIST
paper cells as six processes, or packed K to a process (``--cells-per-process``), and
passes the stage's start as ``--since``. Every round's record carries the wall-clock time
it ended (``ended_at``); the stage's records are those that ended after ``--since``
(without it, all that carry the time: records of an earlier stage, a resumed cell's
rounds done twice or a long pause, are refused). Then:

- window: from the moment every cell had ended its first round of the stage (processes
  started, data loaded, graphs compiled) to the first cell's last round end (every cell
  still running);
- throughput: each cell's rate in the window, its round ends there less one over the time
  from the first of them to the last, summed over the cells: cell-rounds per second of
  this machine, at this load, with this mix of cells. (Counting the round ends in the
  window over its length instead undercounts packed cells, whose rounds end in step: a
  window from one pack's round end to another's holds a fraction of a round of each cell
  that it does not count, about 7% of the rate in a 12-round window on an H100.)
- start-up: the largest, over the cells, of the time from the stage's start to the cell's
  first round end less its median time between two round ends (launch, imports, data
  loading, compiling); without ``--since``, of its first round's time less its median
  round (compiling only);
- projected: the target grid's cells x rounds / throughput, plus one start-up per wave
  of as many cells as were measured (ceil(target cells / measured cells) waves); and
  with the first wave's start-up only: torch keeps compiled graphs in on-disk caches, so a
  later process compiling the same graphs mostly loads them (on this project's CPU a
  compiled cell's first round took 74 s in a fresh cache, 9 s in a second process; about
  2 s for a later round).

The projection assumes the target's cells cost what the measured mix costs per round
(the report names how many of each defense each holds: SDFC's rounds cost about twice a
FedAvg round's on the H200, so a measured mix with more SDFC cells than the target
projects on the high side) and that the target runs as waves of the measured
configuration. Cells with no round in the stage are named and left out.
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections import Counter
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
    """One cell's rounds in the stage: round indices, end times (Unix seconds) and round
    times (seconds), in end-time order."""

    name: str
    defense: str
    rounds: list[int]
    ended_at: list[float]
    round_seconds: list[float]

    def median_round(self) -> float:
        """The median time of the rounds after the first (0 with one round)."""
        rest = self.round_seconds[1:]
        return statistics.median(rest) if rest else 0.0

    def gaps(self) -> list[float]:
        """The wall-clock times between its consecutive round ends."""
        return [b - a for a, b in zip(self.ended_at, self.ended_at[1:])]

    def median_period(self) -> float:
        """The median wall-clock time between two of its round ends (its median round with
        one round): a packed cell's round also waits for its pack-mates' aggregations."""
        gaps = self.gaps()
        return statistics.median(gaps) if gaps else self.median_round()

    def startup(self, since: float | None) -> float:
        """What this cell's process paid once: from the stage's start (``since``) to its first
        round's end, less a median period (launch, imports, data, compiling); without a
        start, its first round's time less a median round (compiling only)."""
        if since is not None:
            return self.ended_at[0] - since - self.median_period()
        return self.round_seconds[0] - self.median_round()

    def rate_between(self, start: float, end: float) -> tuple[int, float] | None:
        """(rounds, seconds) from its first round end in [start, end] to its last there, or
        None with fewer than two ends there."""
        ends = [t for t in self.ended_at if start <= t <= end]
        return (len(ends) - 1, ends[-1] - ends[0]) if len(ends) >= 2 else None

    def stage_problem(self) -> str | None:
        """Why these records are not one stage: a round done twice (a resumed run redoes the
        rounds after its last checkpoint) or a pause far longer than its rounds."""
        if len(set(self.rounds)) < len(self.rounds):
            return f"{self.name} has rounds done twice (resumed)"
        gaps = self.gaps()
        if len(gaps) >= 3 and max(gaps) > 10 * statistics.median(gaps):
            return f"{self.name} paused {max(gaps):.0f} s between two rounds (median {statistics.median(gaps):.0f} s)"
        return None


@dataclass
class Projection:
    cells: int
    warm_at: float
    ended_at: float
    rates: list[tuple[int, float]]  # per cell: (rounds, seconds) within the window
    startup: float

    @property
    def rounds_in_window(self) -> int:
        return sum(rounds for rounds, _ in self.rates)

    @property
    def throughput(self) -> float:
        """Cell-rounds per second while every cell was warm and still running: the cells' rates summed."""
        return sum(rounds / seconds for rounds, seconds in self.rates)

    def seconds_for(self, target_cells: int, target_rounds: int, cached: bool = False) -> float:
        """Every wave paying the start-up, or (``cached``) only the first: the later waves'
        processes find the compiled graphs in torch's on-disk caches (the start-up they
        still pay, tracing and loading, is not measured here and counts as none)."""
        waves = 1 if cached else math.ceil(target_cells / self.cells)
        return target_cells * target_rounds / self.throughput + waves * self.startup


def read_stage(runs: Path, since: float | None = None) -> tuple[list[CellStage], list[str]]:
    """Each cell's records of the stage (ended after ``since``), and the cells without any."""
    if not (runs / CELLS).is_dir():  # the grid never started a cell (a dry run, an early failure)
        raise SystemExit(f"projection: no cells under {runs}")
    stages, silent = [], []
    for cell_dir in sorted(path for path in (runs / CELLS).iterdir() if path.is_dir()):
        records = [r for r in read_jsonl(cell_dir / METRICS)
                   if r.get("ended_at") is not None and (since is None or r["ended_at"] > since)]
        records.sort(key=lambda r: r["ended_at"])
        if not records:
            silent.append(cell_dir.name)
            continue
        stages.append(CellStage(cell_dir.name, defense_of(cell_dir), [r["round"] for r in records],
                                [r["ended_at"] for r in records], [r["time"]["round"] for r in records]))
    return stages, silent


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


def project(stages: list[CellStage], since: float | None = None) -> Projection:
    """Throughput between the moment every cell had ended its first round and the first
    cell's last round end (every cell warm and running), and the start-up a wave pays."""
    if not stages:
        raise SystemExit("no round records with an end time (ended_at) in this folder and window")
    problems = [problem for problem in map(CellStage.stage_problem, stages) if problem]
    if problems:
        raise SystemExit(f"records of more than one stage ({'; '.join(problems)}): pass --since, the stage's start")
    warm_at = max(stage.ended_at[0] for stage in stages)
    ended_at = min(stage.ended_at[-1] for stage in stages)
    rates = {stage.name: stage.rate_between(warm_at, ended_at) for stage in stages}
    short = [name for name, rate in rates.items() if rate is None or rate[1] <= 0]
    if short:
        raise SystemExit(f"{', '.join(short)} ended fewer than two rounds between every cell's first round end "
                         "and the first cell's last: run the stage longer")
    return Projection(len(stages), warm_at, ended_at, list(rates.values()), max(s.startup(since) for s in stages))


def target_of(grid_file: str) -> tuple[int, int, Counter[str]]:
    """The target grid's cells, rounds per cell (the largest) and cells per defense."""
    grid = load_grid(grid_file)
    rounds = max((cell.config.get("federation") or {}).get("rounds", DEFAULT_ROUNDS) for cell in grid.cells)
    return len(grid.cells), rounds, Counter(defense_name(cell.config.get("defense")) for cell in grid.cells)


def report(stages: list[CellStage], silent: list[str], projection: Projection, grid_file: str,
           since: float | None, ran_on: str) -> str:
    cells, rounds, target_mix = target_of(grid_file)
    start = since if since is not None else min(stage.ended_at[0] for stage in stages)
    rows = [[s.name, len(s.ended_at), round(s.ended_at[0] - start, 1), round(s.ended_at[-1] - start, 1),
             round(s.round_seconds[0], 1), round(s.median_round(), 1), round(s.median_period(), 1),
             round(s.startup(since), 1)] for s in stages]
    seconds, cached = projection.seconds_for(cells, rounds), projection.seconds_for(cells, rounds, cached=True)
    origin = "the stage's start" if since is not None else "the first round's end"
    warning = (f"\nNo round in the stage, left out (so the projection is too low if they ran): {', '.join(silent)}.\n"
               if silent else "")
    return (f"### Projected grid time, {ran_on}\n\n"
            + table(["cell", "rounds in the stage", f"first round ended (s after {origin})", "last round ended",
                     "first round (s)", "median round (s)", "median between round ends (s)", "start-up (s)"],
                    rows)
            + f"\n{warning}\nEvery cell warm at {projection.warm_at - start:.1f} s, the first cell's last round "
            f"ended at {projection.ended_at - start:.1f} s: {projection.rounds_in_window} cell-rounds between each "
            f"cell's first and last round end in that time, {projection.throughput * 3600:.0f} cell-rounds per hour "
            f"(the cells' rates summed; {len(stages)} cells at once; start-up "
            f"{projection.startup:.1f} s per wave, {'from the stage start' if since is not None else 'compiling only'}).\n"
            f"Measured mix: {fmt_mix(Counter(s.defense for s in stages))}. Target `{grid_file}`: {cells} cells x "
            f"{rounds} rounds, {fmt_mix(target_mix)}.\n"
            f"Projected: {seconds / 3600:.2f} hours ({cells * rounds} cell-rounds / throughput + "
            f"{math.ceil(cells / len(stages))} waves x start-up); {cached / 3600:.2f} hours with the first wave's "
            "start-up only (a lower bound: the later waves' processes find the compiled graphs in torch's caches, "
            "but still launch and load data, counted here as nothing).\n")


def fmt_mix(counts: Counter[str]) -> str:
    return ", ".join(f"{name} {count}" for name, count in sorted(counts.items()))


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, help="a grid's output folder, its cells run at once")
    parser.add_argument("--grid", default="benchmarks/paper.yaml", help="the grid file to project (default: make bench's)")
    parser.add_argument("--since", type=float, default=None, help="only rounds that ended after this Unix time")
    parser.add_argument("--machine", default=None,
                        help="the machine the stage ran on, for the heading (default: this one, as on the GPU "
                             "machine itself; name it when projecting records copied from another)")
    args = parser.parse_args(argv)
    stages, silent = read_stage(args.runs, args.since)
    text = report(stages, silent, project(stages, args.since), args.grid, args.since, args.machine or machine())
    print(text, flush=True)
    return text


if __name__ == "__main__":
    main()
