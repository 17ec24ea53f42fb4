"""Grid cells trained together: ``fedbench grid FILE --cells-per-process K``.

Unfinished cells that share their model, data, local training and Fabric settings (they
differ in attack, defense, seed, ...) are packed K at a time into one process
(``python -m fedbench.together CONFIG...``), where every round the clients of all of
them train as one cohort (:mod:`fedbench.together`). Each cell still has its own folder,
``config.yaml``, checkpoints, ``metrics.jsonl`` and ``summary.json``; the pack's output
goes to its first cell's ``log.txt`` (the others' name that file). What the grid
promises holds per cell: a finished cell is skipped on the next call, a pack that fails
leaves ``failure.json`` in each of its cells that did not finish (the others in the pack
keep their results; a cell that failed before is re-tried alone, so it cannot fail its
pack-mates again) and the grid goes on, Ctrl-C stops the pack and keeps what finished.
Packed cells train as one cohort whatever the device (``train.cohort`` true or auto, not
false) and need ``fabric.devices=1``; each logs to W&B as its own run, as it does alone.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import yaml

from fedbench.cells import (Cell, CellFailed, Grid, GridProgress, RunningCells, _cell_env, cell_status, check_exit,
                            end_cell, run_cell_isolated, run_process, start_cell)
from fedbench.errors import ConfigError

# What a shared cohort needs alike (fedbench.together checks the built runs again).
SHARED_SECTIONS = ("model", "data", "train", "fabric")


def pack_cells(grid: Grid, positions: list[str], per_process: int) -> list[list[tuple[str, Cell]]]:
    """The grid's cells as packs of up to ``per_process`` unfinished cells that share
    :data:`SHARED_SECTIONS`, in grid order; a finished cell (skipped) and a cell that failed
    before (re-tried) are packs of their own."""
    groups: dict[str, list[tuple[str, Cell]]] = {}
    packs: list[list[tuple[str, Cell]]] = []
    for position, cell in zip(positions, grid.cells):
        if cell_status(cell.directory(grid.output)) in ("finished", "failed"):
            packs.append([(position, cell)])  # skipped, or re-tried alone: a failing cell never takes others down
            continue
        key = json.dumps({k: cell.config.get(k) for k in SHARED_SECTIONS}, sort_keys=True, default=str)
        groups.setdefault(key, []).append((position, cell))
    for members in groups.values():
        packs.extend(members[i:i + per_process] for i in range(0, len(members), per_process))
    return packs


def check_packable(grid: Grid, per_process: int) -> None:
    """One message before any training when a cell cannot be packed."""
    if per_process == 1:
        return
    for cell in grid.cells:
        train = cell.config.get("train") or {}
        if (cell.config.get("fabric") or {}).get("devices", 1) != 1:
            raise ConfigError([("cells_per_process", per_process,
                                f"1 unless every cell trains in one process (fabric.devices=1; {cell.cell_id} "
                                "does not)")])
        if (cell.config.get("fabric") or {}).get("precision") == "16-mixed":
            raise ConfigError([("cells_per_process", per_process,
                                f"1 unless every cell trains as a cohort ({cell.cell_id} sets fabric.precision="
                                "16-mixed, whose one loss scaler would scale all clients together)")])
        if train.get("cohort", "auto") is False:
            raise ConfigError([("cells_per_process", per_process,
                                f"1 unless every cell trains as a cohort ({cell.cell_id} sets train.cohort=false; "
                                "--set train.cohort=auto)")])


def run_pack(grid: Grid, pack: list[tuple[str, Cell]], echo, jobs: int, running: RunningCells | None,
             progress: GridProgress) -> None:
    """The pack's unfinished cells in one process; each cell's end recorded on its own."""
    if running is not None and running.stopping.is_set():
        return
    started_cells = [(position, cell, start_cell(grid, cell, position, True, echo, progress))
                     for position, cell in pack]
    started_cells = [(position, cell, cell_dir) for position, cell, cell_dir in started_cells if cell_dir is not None]
    if not started_cells:
        return
    started = time.perf_counter()
    error: Exception | None = None
    try:
        run_pack_isolated([cell for _, cell, _ in started_cells], [d for _, _, d in started_cells], jobs, running)
    except Exception as err:  # one failed pack never ends the grid
        error = err
    for position, cell, cell_dir in started_cells:
        finished = cell_status(cell_dir) == "finished"
        end_cell(grid, cell, position, echo, progress, started,
                 None if finished else error or CellFailed("no summary written", ""))


def run_pack_isolated(cells: list[Cell], cell_dirs: list[Path], jobs: int, running: RunningCells | None) -> None:
    """The cells' process: ``fedbench.together``, or for one cell (a retry, the last pack of a
    group) ``fedbench run`` as unpacked, so a cell the cohort cannot train (a model with
    random layers: ``train.cohort=auto`` trains it sequentially) runs when retried alone."""
    if len(cells) == 1:
        run_cell_isolated(cells[0], cell_dirs[0], jobs, running)
        return
    configs = []
    for cell, cell_dir in zip(cells, cell_dirs):
        configs.append(cell_dir / "cell_config.yaml")
        configs[-1].write_text(yaml.safe_dump(cell.config, sort_keys=False))
    log_path = cell_dirs[0] / "log.txt"
    for cell_dir in cell_dirs[1:]:
        (cell_dir / "log.txt").write_text(f"trained in one process with {', '.join(c.cell_id for c in cells)}; "
                                          f"the process's log: {log_path}\n")
    command = [sys.executable, "-m", "fedbench.together", *map(str, configs)]
    check_exit(run_process(command, log_path, _cell_env(cells[0], jobs), running), log_path, running)
