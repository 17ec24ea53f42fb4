"""Running one grid cell and recording how it ended, shared by the launchers: a cell's
folder, its process, ``failure.json``, ``grid_summary.json`` and the grid's progress line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean
from typing import Any

import yaml

from fedbench.results import SUMMARY, read_summary, write_json_atomic

CELLS = "cells"
GRID_SUMMARY = "grid_summary.json"


@dataclass
class Cell:
    cell_id: str
    axes: dict[str, Any]
    config: dict

    def directory(self, grid_dir: Path) -> Path:
        return grid_dir / CELLS / self.cell_id


@dataclass
class Grid:
    name: str
    base: dict
    axes: dict[str, list]
    output: Path
    isolate: bool = True
    checkpoint_every: int = 5
    cells: list[Cell] = field(default_factory=list)
    file: str | None = None
    jobs: int = 1
    settings: list[str] = field(default_factory=list)  # --set KEY=VALUE, applied over the file


def cell_status(cell_dir: Path) -> str:
    if (cell_dir / SUMMARY).exists():
        return "finished"
    if (cell_dir / "failure.json").exists():
        return "failed"
    if cell_dir.exists():
        return "interrupted"
    return "pending"


def _set_parent_death_signal() -> None:
    """Linux: the cell process dies with the grid process, even after kill -9."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def run_cell_in_process(cell: Cell, cell_dir: Path) -> None:
    from fedbench.execution import execute
    from fedbench.config import build_experiment, build_parser, parse_config_dict

    parser = build_parser()
    execute(build_experiment(parse_config_dict(cell.config, parser), parser))


class RunningCells:
    """Cell processes of a parallel grid, so an interrupt can stop them all."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.processes: set[subprocess.Popen] = set()
        self.stopping = threading.Event()

    def stop_all(self) -> None:
        self.stopping.set()
        with self.lock:
            processes = list(self.processes)
        for process in processes:  # all at once, then wait for each
            process.terminate()
        for process in processes:
            _wait_or_kill(process)


def _wait_or_kill(process: subprocess.Popen) -> None:
    """After SIGTERM: 30 s to exit, then SIGKILL."""
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


def _cell_env(cell: Cell, jobs: int, threads: int | None = None, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The cell process's environment: ``threads`` (a Ray task's CPUs), else cores / jobs
    threads when several cells share the machine, unless the config pins them; plus ``extra``."""
    env = {**os.environ, **(extra or {})}
    pinned = (cell.config.get("fabric") or {}).get("cpu_threads")
    if pinned is None and threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    elif jobs > 1 and pinned is None and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    return env


def run_cell_isolated(cell: Cell, cell_dir: Path, jobs: int = 1, running: RunningCells | None = None,
                      threads: int | None = None, extra_env: dict[str, str] | None = None) -> None:
    config_path = cell_dir / "cell_config.yaml"
    config_path.write_text(yaml.safe_dump(cell.config, sort_keys=False))
    log_path = cell_dir / "log.txt"
    command = [sys.executable, "-m", "fedbench.cli", "run", "--config", str(config_path)]
    code = run_process(command, log_path, _cell_env(cell, jobs, threads, extra_env), running)
    check_exit(code, log_path, running)


def run_process(command: list[str], log_path: Path, env: dict[str, str], running: RunningCells | None) -> int:
    """A cell's (or a pack of cells') process, its output in ``log_path``; its exit status.
    An interrupt here stops it."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   preexec_fn=_set_parent_death_signal, env=env)
        if running is not None:
            with running.lock:
                running.processes.add(process)
        try:
            return process.wait()
        except BaseException:
            process.terminate()
            _wait_or_kill(process)
            raise
        finally:
            if running is not None:
                with running.lock:
                    running.processes.discard(process)


def check_exit(code: int, log_path: Path, running: RunningCells | None) -> None:
    """An interrupted process is not a failure (it resumes on the next call); any other
    non-zero exit is, with its log's tail."""
    if (running is not None and running.stopping.is_set()) or code in (130, -signal.SIGINT, -signal.SIGTERM):
        raise KeyboardInterrupt("cell interrupted")
    if code != 0:
        tail = log_path.read_text().strip().splitlines()[-15:]
        raise CellFailed(f"exit status {code}", "\n".join(tail))


class CellFailed(Exception):
    """A cell's process failed: ``reason`` (e.g. its exit status) and ``detail`` (its log's tail)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason)
        self.detail = detail

    def __reduce__(self):  # picklable, so it crosses from a Ray worker intact
        return CellFailed, (str(self), self.detail)


def write_grid_summary(grid: Grid) -> dict:
    rows = []
    for cell in grid.cells:
        cell_dir = cell.directory(grid.output)
        status = cell_status(cell_dir)
        row: dict[str, Any] = {"cell": cell.cell_id, "status": status, "axes": cell.axes}
        if status == "finished":
            summary = read_summary(cell_dir) or {}
            row.update(final=summary.get("final"), detection=summary.get("detection"),
                       wall_time_s=summary.get("wall_time_s"))
        elif status == "failed":
            row["error"] = json.loads((cell_dir / "failure.json").read_text()).get("error")
        rows.append(row)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("finished", "failed", "interrupted", "pending")}
    summary = {"grid": grid.name, "cells": rows, "counts": counts}
    write_json_atomic(grid.output / GRID_SUMMARY, summary)
    return summary


_SUMMARY_LOCK = threading.Lock()


class GridProgress:
    """One line for the whole grid: cells done (finished earlier ones counted apart),
    failed, running, and the time left estimated from this run's finished cells
    (mean cell time x cells left / cells at a time)."""

    def __init__(self, name: str, total: int, jobs: int) -> None:
        self.name, self.total, self.jobs = name, total, jobs
        self.earlier = self.done = self.failed = 0
        self.running: set[str] = set()
        self.durations: list[float] = []
        self.lock = threading.Lock()

    def started(self, cell_id: str) -> None:
        with self.lock:
            self.running.add(cell_id)

    def ended(self, cell_id: str, seconds: float | None, failed: bool = False, earlier: bool = False) -> None:
        with self.lock:
            self.running.discard(cell_id)
            self.earlier += earlier
            self.done += not failed
            self.failed += failed
            if seconds is not None and not earlier:
                self.durations.append(seconds)

    def line(self) -> str:
        with self.lock:
            left = self.total - self.done - self.failed
            eta = ""
            if self.durations and left:
                minutes = fmean(self.durations) * left / min(self.jobs, left) / 60
                eta = f"; about {minutes:.0f} min left" if minutes >= 1 else "; under a minute left"
            earlier = f" ({self.earlier} earlier)" if self.earlier else ""
            return (f"grid {self.name}: {self.done}/{self.total} done{earlier}, {self.failed} failed, "
                    f"{len(self.running)} running{eta}")


def run_one(grid: Grid, cell: Cell, position: str, isolate: bool, echo, jobs: int = 1,
            running: RunningCells | None = None, progress: GridProgress | None = None) -> None:
    if running is not None and running.stopping.is_set():
        return
    progress = progress or GridProgress(grid.name, len(grid.cells), jobs)
    cell_dir = start_cell(grid, cell, position, isolate, echo, progress)
    if cell_dir is None:
        return
    started = time.perf_counter()
    error = None
    try:
        if isolate:
            run_cell_isolated(cell, cell_dir, jobs, running)
        else:
            run_cell_in_process(cell, cell_dir)
    except Exception as err:  # one failed cell never ends the grid
        error = err
    end_cell(grid, cell, position, echo, progress, started, error)


def start_cell(grid: Grid, cell: Cell, position: str, isolate: bool, echo, progress: GridProgress,
               verb: str = "running") -> Path | None:
    """Prepare a cell's folder and say so; None (and a line) when it finished earlier."""
    cell_dir = cell.directory(grid.output)
    if cell_status(cell_dir) == "finished":
        progress.ended(cell.cell_id, None, earlier=True)
        echo(f"{position} {cell.cell_id}: finished earlier, skipped | {progress.line()}")
        return None
    cell_dir.mkdir(parents=True, exist_ok=True)
    (cell_dir / "failure.json").unlink(missing_ok=True)
    write_json_atomic(cell_dir / "cell.json", {"cell": cell.cell_id, "axes": cell.axes})
    progress.started(cell.cell_id)
    where = f"{cell_dir}" + (f" (log: {cell_dir / 'log.txt'})" if isolate else "")
    echo(f"{position} {cell.cell_id}: {verb} -> {where}")
    return cell_dir


def end_cell(grid: Grid, cell: Cell, position: str, echo, progress: GridProgress, started: float,
             error: BaseException | None = None) -> None:
    """Record how a cell ended: its final numbers, or ``failure.json`` with the error."""
    cell_dir = cell.directory(grid.output)
    seconds = time.perf_counter() - started
    if error is None:
        try:
            final = (read_summary(cell_dir) or {}).get("final", {})
            shown = ", ".join(f"{k}={v:.1f}" for k, v in final.items() if isinstance(v, (int, float)))
        except Exception as err:  # an unreadable summary is this cell's failure, not the grid's
            error = err
    if error is None:
        progress.ended(cell.cell_id, seconds)
        echo(f"{position} {cell.cell_id}: {shown} ({seconds:.0f}s) | {progress.line()}")
    else:
        detail = error.detail if isinstance(error, CellFailed) else "".join(
            traceback.format_exception(type(error), error, error.__traceback__))
        write_json_atomic(cell_dir / "failure.json", {"cell": cell.cell_id, "error": str(error), "detail": detail})
        progress.ended(cell.cell_id, seconds, failed=True)
        echo(f"{position} {cell.cell_id}: FAILED: {error} | {progress.line()}")
    with _SUMMARY_LOCK:
        write_grid_summary(grid)


