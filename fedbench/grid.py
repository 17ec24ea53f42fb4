"""``fedbench grid``: every cell of an attack x defense x ... grid, resumable.

A grid file (YAML)::

    name: quick                  # W&B group and default output folder runs/<name>
    base: configs/quick.yaml     # a run config (path relative to this file) or a mapping
    overrides:                   # dotted config keys set in every cell (not part of cell ids)
      federation.rounds: 10
    isolate: true                # each cell in its own process (one failure never ends the grid)
    jobs: 2                      # cells at once, each in its own process (CPU: cores / jobs threads each);
                                 # auto: as many as the cores and the GPU's free memory take (fedbench.packing)
    axes:                        # dotted config keys -> values; the cells are the product
      attack: [none, pixel_pattern, badnets]
      defense: [fedavg, krum, sdfc]
      partition.beta: [0.5, 0.3]
      attack.malicious_fraction: [0.3, 0.2]
      seed: [0, 1]
    exclude:                     # combinations to leave out: every key given must match
      - {attack: none, defense: krum}

Axes and overrides on ``attack.<arg>``/``defense.<arg>`` apply only to the classes that
take that argument (``attack: none`` has no malicious fraction; ``defense.estimator``
reaches only SDFC cells), and duplicate cells are merged; an override that no cell's
class takes is refused before any cell runs.
The base config's attack/defense arguments carry over to each class on the axis that
accepts them.

Layout of the output folder: ``cells/<cell id>/`` holds ``cell.json`` (the axis
values), ``config.yaml`` (the complete run config), the run's files and, when it
finished, ``summary.json`` (written atomically, last). A cell with a summary is never
run again; one whose summary or checkpoint was made under another config than the one
asked for now is refused before any cell runs (fedbench.config_changes). A failed cell gets ``failure.json`` with its error and is retried on the
next call. ``grid_summary.json`` lists every cell's status. A killed cell resumes from
its last checkpoint (the grid turns checkpoints on).

With ``jobs`` > 1 cells run in parallel processes. A cell's numbers depend on its CPU
thread count (kernels sum per thread), so a grid meant to give the same numbers on
every machine pins ``fabric.cpu_threads`` in its overrides; otherwise each process gets
cores / jobs threads.
"""

from __future__ import annotations

import copy
import fcntl
import fnmatch
import functools
import itertools
import os
import re
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import yaml

from fedbench.cells import (  # noqa: F401  (CELLS, GridProgress: part of this module's interface)
    CELLS, Cell, Grid, GridProgress, RunningCells, cell_status, run_one, write_grid_summary,
)
from fedbench.cell_packs import check_packable, pack_cells, run_pack
from fedbench.config_changes import refuse_changed_cells
from fedbench.errors import ConfigError, FedbenchError
from fedbench.packing import GPU_MEMORY_PER_CELL_GB, auto_jobs
from fedbench.results import write_json_atomic

if TYPE_CHECKING:
    from fedbench.ray_launcher import RayOptions

SHORT_NAMES = {"partition.beta": "beta", "attack.malicious_fraction": "mal", "data.name": "", "seed": "s"}


def _set_path(config: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = config
    for key in keys[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[keys[-1]] = value


def _choice_as_dict(value: Any) -> dict:
    if isinstance(value, str):
        return {"class_path": value, "init_args": {}}
    if isinstance(value, dict):
        return {"class_path": value["class_path"], "init_args": dict(value.get("init_args") or {})}
    raise ConfigError([("axes", value, "an attack/defense name or a {class_path, init_args} mapping")])


def value_label(value: Any) -> str:
    """A short readable label of an axis value; an attack/defense with arguments keeps them
    (``{class_path: sdfc, init_args: {mode: full}}`` -> ``sdfc_mode_full``)."""
    if isinstance(value, dict):
        name = value_label(value.get("class_path", "custom"))
        args = value.get("init_args") or {}
        return "_".join([name, *(f"{k}_{value_label(v)}" for k, v in args.items())])
    text = str(value)
    if isinstance(value, str) and "." in text and not re.fullmatch(r"[0-9.eE+-]+", text):
        text = text.rsplit(".", 1)[-1]
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text)


def cell_id_for(axes: dict[str, Any]) -> str:
    parts = []
    for key, value in axes.items():
        prefix = SHORT_NAMES.get(key, "" if key in ("attack", "defense") else key.rsplit(".", 1)[-1])
        parts.append(f"{prefix}{value_label(value)}")
    return "-".join(parts)


def _pick(base_choice: Any, chosen: Any) -> dict:
    """The chosen attack/defense, with the base config's arguments that it accepts
    (e.g. a base poison_ratio applies to every attack on the axis)."""
    from fedbench.config import accepted_arguments

    picked = _choice_as_dict(chosen)
    if base_choice is not None:
        accepted = accepted_arguments(picked["class_path"])
        inherited = {k: v for k, v in _choice_as_dict(base_choice)["init_args"].items() if k in accepted}
        picked["init_args"] = {**inherited, **picked["init_args"]}
    return picked


def _excluded(chosen: dict[str, Any], exclude: list[dict]) -> bool:
    """Whether an axis combination matches every key of some ``exclude`` entry (attack and
    defense values compare by label, so ``sdfc`` matches the name in any form)."""
    return any(all(value_label(chosen[k]) == value_label(v) for k, v in entry.items()) for entry in exclude)


def check_exclude(exclude: Any, axes: dict[str, list]) -> None:
    if not isinstance(exclude, list) or not all(isinstance(e, dict) and e and set(e) <= set(axes) for e in exclude):
        raise ConfigError([("grid.exclude", exclude, f"a list of mappings from axis keys ({', '.join(axes)}) "
                            "to values, e.g. [{attack: none, defense: krum}]")])


def expand_cells(base: dict, axes: dict[str, list], checkpoint_every: int, name: str, output: Path,
                 overrides: dict | None = None, exclude: list[dict] | None = None) -> list[Cell]:
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise ConfigError([(f"axes.{key}", values, "a non-empty list of values")])
    check_exclude(exclude or [], axes)
    base = copy.deepcopy(base)
    overrides = dict(overrides or {})
    choice_overrides = {k: overrides.pop(k) for k in list(overrides) if _choice_argument(k)}
    for key, value in overrides.items():
        _set_path(base, key, value)
    cells: dict[str, Cell] = {}
    keys = list(axes)
    taken: set[str] = set()
    for combination in itertools.product(*(axes[k] for k in keys)):
        chosen = dict(zip(keys, combination))
        if _excluded(chosen, exclude or []):
            continue
        config = copy.deepcopy(base)
        for choice in ("attack", "defense"):
            if choice in chosen:
                config[choice] = _pick(base.get(choice), chosen[choice])
            elif choice in config:
                config[choice] = _choice_as_dict(config[choice])
        taken |= {k for k, v in choice_overrides.items() if _set_choice_argument(config, k, v)}
        applied: dict[str, Any] = {}
        for key, value in chosen.items():
            if _choice_argument(key):
                if not _set_choice_argument(config, key, value):
                    continue  # e.g. a malicious fraction for attack "none"
            elif key not in ("attack", "defense"):  # those were picked above
                _set_path(config, key, value)
            applied[key] = value
        cell_id = cell_id_for(applied)
        config.setdefault("output", {})
        config["output"].update({"dir": str(output / CELLS), "name": cell_id, "resume": True,
                                 "checkpoint_every": checkpoint_every, "progress": False})
        config.setdefault("wandb", {})
        config["wandb"]["group"] = config["wandb"].get("group") or name
        cells.setdefault(cell_id, Cell(cell_id, applied, config))
    unused = sorted(set(choice_overrides) - taken)
    if unused:
        raise ConfigError([(f"grid.overrides.{k}", choice_overrides[k], f"an argument of the grid's "
                            f"{k.partition('.')[0]}s; none of them takes {k.partition('.')[2]!r}") for k in unused])
    return list(cells.values())


def _choice_argument(key: str) -> bool:
    """``attack.<arg>`` / ``defense.<arg>``: an argument of the chosen attack or defense."""
    head, _, arg = key.partition(".")
    return head in ("attack", "defense") and bool(arg)


def _set_choice_argument(config: dict, key: str, value: Any) -> bool:
    """Set ``attack.<arg>``/``defense.<arg>`` in the cell's class_path/init_args when its
    class takes that argument; False (nothing set) when it does not."""
    from fedbench.config import accepted_arguments

    head, _, arg = key.partition(".")
    selected = config.get(head) or {"class_path": "none" if head == "attack" else "fedavg"}
    config[head] = selected = _choice_as_dict(selected)
    if arg not in accepted_arguments(selected["class_path"]):
        return False
    selected["init_args"][arg] = value
    return True


def load_grid(path: str | Path, output: str | None = None, settings: Sequence[str] = ()) -> Grid:
    """A grid file, with ``settings`` (``KEY=VALUE``, from ``--set``) applied on top:
    ``axes.<key>=[...]`` replaces an axis, any other key joins the overrides."""
    path = Path(path)
    if not path.exists():
        raise FedbenchError(f"grid file {path} not found")
    spec = yaml.safe_load(path.read_text()) or {}
    spec.setdefault("overrides", {})
    for setting in settings:
        key, eq, text = setting.partition("=")
        if not eq or not key:
            raise ConfigError([("--set", setting, "KEY=VALUE, e.g. federation.rounds=2 or axes.seed=[0]")])
        value = yaml.safe_load(text)
        if key.startswith("axes."):
            spec.setdefault("axes", {})[key[len("axes."):]] = value
        elif isinstance(spec["overrides"], dict):
            spec["overrides"][key] = value
    keys = {"name", "base", "overrides", "axes", "exclude", "output", "isolate", "jobs", "checkpoint_every",
            "description"}
    unknown = set(spec) - keys
    if unknown:
        raise ConfigError([(f"grid.{k}", spec[k], f"not a grid key ({', '.join(sorted(keys))})")
                           for k in sorted(unknown)])
    base = spec.get("base") or {}
    if isinstance(base, str):
        base_path = (path.parent / base)
        if not base_path.exists():
            raise ConfigError([("grid.base", base, f"a run config file; {base_path} does not exist")])
        base = yaml.safe_load(base_path.read_text()) or {}
    if not isinstance(spec.get("axes"), dict) or not spec["axes"]:
        raise ConfigError([("grid.axes", spec.get("axes"), "a mapping of config keys to lists of values")])
    name = spec.get("name") or path.stem
    out = Path(output or spec.get("output") or Path("runs") / name)
    grid = Grid(name, base, spec["axes"], out, bool(spec.get("isolate", True)), int(spec.get("checkpoint_every", 5)),
                file=str(path), jobs=spec.get("jobs", 1), settings=list(settings))
    check_jobs(grid.jobs, "grid.jobs")
    overrides = spec.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise ConfigError([("grid.overrides", overrides, "a mapping of dotted config keys to values")])
    grid.cells = expand_cells(base, grid.axes, grid.checkpoint_every, name, out, overrides, spec.get("exclude"))
    return grid


def select_cells(grid: Grid, patterns: Sequence[str]) -> None:
    """Keep only the cells whose id matches one of the shell-style ``patterns``."""
    if not patterns:
        return
    kept = [c for c in grid.cells if any(fnmatch.fnmatchcase(c.cell_id, p) for p in patterns)]
    if not kept:
        raise ConfigError([("--cells", ", ".join(patterns), "a pattern matching a cell id (see --dry-run), "
                            "e.g. 'pixel_pattern-*-s0'")])
    grid.cells = kept


def check_jobs(jobs: Any, field_name: str) -> None:
    if jobs == "auto":
        return
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise ConfigError([(field_name, jobs, "an integer >= 1 (cells run at once) or auto")])


def jobs_option(text: str | None) -> int | str | None:
    """``--jobs`` as given: a number becomes an int; anything else :func:`check_jobs` judges."""
    return int(text) if text is not None and text.isdigit() else text


def validate_cells(grid: Grid) -> None:
    """Parse every cell's config before any training, so a typo fails the grid at once;
    then compare each cell's complete config with the one it ran with in an earlier call,
    if any (fedbench.config_changes: a changed finished cell is refused, never skipped)."""
    from jsonargparse import ArgumentError

    from fedbench.config import build_experiment, build_parser, parse_config_dict
    from fedbench.experiment import validate

    parser = build_parser()
    problems, configs = [], []
    for cell in grid.cells:
        try:
            experiment = build_experiment(parse_config_dict(cell.config, parser), parser)
            validate(experiment)
            configs.append((cell.cell_id, cell.directory(grid.output), experiment.config))
        except ConfigError as err:
            problems.extend((f"{cell.cell_id}: {f}", v, a) for f, v, a in err.problems)
        except ArgumentError as err:
            problems.append((cell.cell_id, "config", str(err).strip().splitlines()[0]))
    if problems:
        raise ConfigError(problems)
    refuse_changed_cells(configs, grid.output)


class GridLock:
    """One grid process per output folder; the OS drops the lock when the process dies."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / ".grid.lock"

    def __enter__(self) -> "GridLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.path, "w")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FedbenchError(f"another fedbench grid is running on {self.path.parent}") from None
        self.handle.write(str(os.getpid()))
        self.handle.flush()
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()


def _terminate_on_sigterm(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_grid(grid: Grid, isolate: bool | None = None, echo=print, jobs: int | str | None = None,
             launcher: str = "local", ray_options: "RayOptions | None" = None,
             gpu_memory_per_cell: float = GPU_MEMORY_PER_CELL_GB, cells_per_process: int = 1) -> dict:
    """Every unfinished cell: ``jobs`` at a time on this machine (jobs > 1 runs each cell in
    its own process; ``auto``: see fedbench.packing; ``cells_per_process`` > 1 trains that
    many compatible cells together in each process, see fedbench.cell_packs), or as Ray
    tasks (``launcher="ray"``, see fedbench.ray_launcher)."""
    isolate = grid.isolate if isolate is None else isolate
    jobs = grid.jobs if jobs is None else jobs
    check_grid_options(grid, jobs, launcher, cells_per_process)
    if jobs == "auto":
        if not gpu_memory_per_cell > 0:
            raise ConfigError([("gpu_memory_per_cell", gpu_memory_per_cell, "a number of GB > 0")])
        # a process of a pack holds cells_per_process cells: that many times a cell's memory
        jobs, why = auto_jobs([c.config for c in grid.cells], gpu_memory_per_cell * cells_per_process)
        echo(f"grid {grid.name}: jobs auto = {jobs} ({why})")
    previous = signal.signal(signal.SIGTERM, _terminate_on_sigterm)
    started = time.perf_counter()
    try:
        with GridLock(grid.output):
            write_json_atomic(grid.output / "grid.json", {
                "name": grid.name, "file": grid.file, "settings": grid.settings, "axes": grid.axes,
                "base": grid.base, "jobs": jobs, "launcher": launcher, "cells": [c.cell_id for c in grid.cells]})
            positions = [f"[{index}/{len(grid.cells)}]" for index in range(1, len(grid.cells) + 1)]
            if launcher == "ray":
                from fedbench.ray_launcher import RayOptions, run_on_ray

                run_on_ray(grid, positions, echo, ray_options or RayOptions())
            elif cells_per_process > 1:
                _run_packs(grid, positions, echo, jobs, cells_per_process)
            else:
                _run_local(grid, positions, isolate, echo, jobs)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if grid.output.exists():
            write_grid_summary(grid)
    summary = write_grid_summary(grid)
    summary["wall_time_s"] = time.perf_counter() - started
    return summary


LAUNCHERS = ("local", "ray")


def _run_local(grid: Grid, positions: list[str], isolate: bool, echo, jobs: int) -> None:
    progress = GridProgress(grid.name, len(grid.cells), jobs)
    if jobs == 1:
        for position, cell in zip(positions, grid.cells):
            run_one(grid, cell, position, isolate, echo, progress=progress)
        return
    running = RunningCells()
    in_pool(jobs, running, [functools.partial(run_one, grid, cell, position, True, echo, jobs, running, progress)
                            for position, cell in zip(positions, grid.cells)])


def _run_packs(grid: Grid, positions: list[str], echo, jobs: int, per_process: int) -> None:
    """Packs of compatible cells (fedbench.cell_packs), ``jobs`` packs at a time."""
    progress = GridProgress(grid.name, len(grid.cells), jobs * per_process)
    running = RunningCells()
    in_pool(jobs, running, [functools.partial(run_pack, grid, pack, echo, jobs, running, progress)
                            for pack in pack_cells(grid, positions, per_process)])


def in_pool(jobs: int, running: RunningCells, calls: list[Callable[[], None]]) -> None:
    """The calls, ``jobs`` at a time; an interrupt cancels the queued ones and stops the
    running cells' processes."""
    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        for future in [pool.submit(call) for call in calls]:
            future.result()
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        running.stop_all()
        raise
    pool.shutdown()


def check_grid_options(grid: Grid, jobs: int | str, launcher: str, cells_per_process: int) -> None:
    """The grid command's options and every cell's config, before any cell runs (a dry run
    checks them too): one message naming each field."""
    check_jobs(jobs, "jobs")
    if launcher not in LAUNCHERS:
        raise ConfigError([("launcher", launcher, f"one of: {', '.join(LAUNCHERS)}")])
    check_cells_per_process(cells_per_process, launcher)
    validate_cells(grid)
    check_packable(grid, cells_per_process)


def check_cells_per_process(value: Any, launcher: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError([("cells_per_process", value, "an integer >= 1")])
    if value > 1 and launcher != "local":
        raise ConfigError([("cells_per_process", value, "1 with --launcher ray (packs run on the local launcher)")])


def ray_options_from(args) -> "RayOptions | None":
    if args.launcher != "ray":
        return None
    from fedbench.ray_launcher import RayOptions

    return RayOptions(address=args.ray_address, cpus_per_cell=args.cpus_per_cell, gpus_per_cell=args.gpus_per_cell)


def grid_parser():
    """``fedbench grid``'s options."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="fedbench grid", description="Run every cell of a grid file; finished cells "
                            "are skipped, so running it again resumes.", exit_on_error=False, default_env=False)
    parser.add_argument("grid_file", type=str, help="the grid YAML")
    parser.add_argument("--out", type=str | None, default=None, help="output folder (default: runs/<name>)")
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help="list the cells and their status, run nothing")
    parser.add_argument("--isolate", type=bool | None, default=None,
                        help="run each cell in its own process (default: the grid file's choice)")
    parser.add_argument("--jobs", type=str | None, default=None,
                        help="cells at once, each in its own process, or auto: as many as the cores and "
                             "the GPU's free memory take (default: the grid file's jobs, else 1)")
    parser.add_argument("--gpu-memory-per-cell", "--gpu_memory_per_cell", dest="gpu_memory_per_cell", type=float,
                        default=GPU_MEMORY_PER_CELL_GB,
                        help="--jobs auto on a GPU: GB each cell needs (1.5: a simple_cnn paper cell)")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                        help="repeatable; a config override for every cell (federation.rounds=2, "
                             "defense.estimator=empirical) or an axis (axes.seed=[0])")
    parser.add_argument("--cells", action="append", default=[], metavar="PATTERN",
                        help="repeatable; run only cells whose id matches (shell pattern, e.g. '*-sdfc-*')")
    parser.add_argument("--cells-per-process", "--cells_per_process", dest="cells_per_process", type=int,
                        default=1, help="train up to this many cells with the same model, data and training "
                        "settings together in one process, their clients in one cohort each round (whatever "
                        "the device; refused for cells that set train.cohort=false; default 1)")
    parser.add_argument("--launcher", type=str, default="local",
                        help="local (--jobs processes on this machine) or ray (cells as Ray tasks; "
                             "pip install -e '.[ray]')")
    parser.add_argument("--ray-address", "--ray_address", dest="ray_address", type=str | None, default=None,
                        help="ray: a running cluster's address (auto: the one this machine belongs to); "
                             "default: start a local cluster")
    parser.add_argument("--cpus-per-cell", "--cpus_per_cell", dest="cpus_per_cell", type=float | None,
                        default=None, help="ray: CPUs each cell asks for (default: its fabric.cpu_threads, else 1)")
    parser.add_argument("--gpus-per-cell", "--gpus_per_cell", dest="gpus_per_cell", type=float, default=0.0,
                        help="ray: GPUs (a fraction shares one) each cell asks for (default 0)")
    return parser


def print_dry_run(grid: Grid, cells_per_process: int) -> None:
    """Each cell's status and id, and with ``cells_per_process`` > 1 the process (pack) it
    would train in."""
    packs = pack_cells(grid, [""] * len(grid.cells), cells_per_process) if cells_per_process > 1 else []
    pack_of = {cell.cell_id: index for index, pack in enumerate(packs, 1) for _, cell in pack}
    for cell in grid.cells:
        pack = f"  process {pack_of[cell.cell_id]}" if pack_of else ""
        print(f"{cell_status(cell.directory(grid.output)):11s} {cell.cell_id}{pack}")
    processes = f" in {len(packs)} processes of up to {cells_per_process}" if packs else ""
    print(f"{len(grid.cells)} cells{processes} -> {grid.output}")


def grid_command(argv: Sequence[str]) -> int:
    from jsonargparse import ArgumentError

    from fedbench.execution import fail

    parser = grid_parser()
    try:
        args = parser.parse_args(list(argv))
    except ArgumentError as err:
        return fail(str(err).strip(), "grid")
    try:
        grid = load_grid(args.grid_file, args.out, args.settings)
        select_cells(grid, args.cells)
        if args.dry_run:
            jobs = jobs_option(args.jobs)
            check_grid_options(grid, grid.jobs if jobs is None else jobs, args.launcher, args.cells_per_process)
            print_dry_run(grid, args.cells_per_process)
            return 0
        summary = run_grid(grid, args.isolate, jobs=jobs_option(args.jobs), launcher=args.launcher,
                           ray_options=ray_options_from(args), gpu_memory_per_cell=args.gpu_memory_per_cell,
                           cells_per_process=args.cells_per_process)
    except KeyboardInterrupt:
        print("interrupted: finished cells are kept; run the same command again to resume", file=sys.stderr)
        return 130
    except FedbenchError as err:
        return fail(str(err), "grid")
    counts = summary["counts"]
    print(f"grid {grid.name}: {counts['finished']} finished, {counts['failed']} failed "
          f"in {summary['wall_time_s']:.0f}s -> {grid.output}")
    return 0 if counts["failed"] == 0 else 1
