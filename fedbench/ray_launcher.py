"""``fedbench grid FILE --launcher ray``: every cell a Ray task (``pip install -e ".[ray]"``).

Without an address, ``ray.init()`` starts a local cluster on this machine; with
``--ray-address auto`` the grid joins the cluster this machine belongs to (started with
``ray start --head`` on one node and ``ray start --address=HEAD:6379`` on the others).
Each cell asks for ``cpus_per_cell`` CPUs (default: its ``fabric.cpu_threads``, else 1;
its process gets that many threads unless the config pins ``fabric.cpu_threads``, which
wins so that the numbers stay the same) and ``gpus_per_cell`` GPUs, a fraction letting
several cells share one GPU (Ray sets ``CUDA_VISIBLE_DEVICES`` for the task); a cell that
asks for no GPU sees none.

A task runs the cell exactly as the local launcher does (its own ``fedbench run``
process writing into the cell's folder), so every promise of the local grid holds:
finished cells are skipped, summaries are written atomically, a failed cell leaves
``failure.json`` and the others go on, Ctrl-C cancels the running tasks (their cell
processes die with them) and keeps what finished. The output folder must be one every
node sees (a shared file system) when the cluster has more than one machine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from fedbench.cells import Cell, CellFailed, Grid, GridProgress, end_cell, run_cell_isolated, start_cell
from fedbench.errors import FedbenchError


@dataclass
class RayOptions:
    """Args:
    address: None starts a local cluster; ``auto`` or ``HOST:PORT`` joins a running one.
    cpus_per_cell: CPUs a cell asks for (None: its fabric.cpu_threads, else 1).
    gpus_per_cell: GPUs a cell asks for; a fraction (0.25) lets 4 cells share one.
    """

    address: str | None = None
    cpus_per_cell: float | None = None
    gpus_per_cell: float = 0.0


def run_cell_task(cell: Cell, cell_dir: str, threads: int, hide_gpus: bool) -> None:
    """On a Ray worker: the cell in its own process, as the local launcher runs it. A cell
    that asked for no GPU sees none (recent Ray no longer hides them from such tasks)."""
    extra = {"CUDA_VISIBLE_DEVICES": ""} if hide_gpus else None
    run_cell_isolated(cell, Path(cell_dir), threads=threads, extra_env=extra)


def _ray():
    try:
        import ray
    except ImportError:
        raise FedbenchError('--launcher ray needs Ray: pip install -e ".[ray]"') from None
    return ray


def cpus_of(cell: Cell, options: RayOptions) -> float:
    if options.cpus_per_cell is not None:
        return options.cpus_per_cell
    return float((cell.config.get("fabric") or {}).get("cpu_threads") or 1)


def run_on_ray(grid: Grid, positions: list[str], echo, options: RayOptions) -> None:
    """Submit every unfinished cell as a task, record each as it ends; on an interrupt
    cancel what is queued or running (it resumes on the next call) and keep the rest."""
    ray = _ray()
    if not ray.is_initialized():
        ray.init(address=options.address, include_dashboard=False, log_to_driver=False)
    task = ray.remote(run_cell_task)
    cells_at_once = max(1, int(ray.cluster_resources().get("CPU", 1) // max(cpus_of(grid.cells[0], options), 1)))
    progress = GridProgress(grid.name, len(grid.cells), cells_at_once)
    pending = {}
    try:
        for position, cell in zip(positions, grid.cells):
            cell_dir = start_cell(grid, cell, position, True, echo, progress, verb="queued")
            if cell_dir is None:
                continue
            cpus = cpus_of(cell, options)
            ref = task.options(num_cpus=cpus, num_gpus=options.gpus_per_cell, max_retries=0).remote(
                cell, str(cell_dir), max(1, int(cpus)), options.gpus_per_cell == 0)
            pending[ref] = (position, cell, time.perf_counter())
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            position, cell, started = pending.pop(ref)
            error = task_error(ray, ref)
            if isinstance(error, KeyboardInterrupt):
                echo(f"{position} {cell.cell_id}: interrupted; it resumes on the next call")
                continue
            end_cell(grid, cell, position, echo, progress, started, error)
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise


def task_error(ray, ref) -> BaseException | None:
    """None when the task finished; KeyboardInterrupt when the cell was stopped (not a
    failure: it resumes); else the cell's own error (CellFailed with its log's tail)."""
    try:
        ray.get(ref)
    except ray.exceptions.TaskCancelledError:
        return KeyboardInterrupt("cancelled")
    except ray.exceptions.RayTaskError as err:
        cause = err.cause if isinstance(err.cause, BaseException) else err
        return KeyboardInterrupt("interrupted") if isinstance(cause, KeyboardInterrupt) else cause
    except ray.exceptions.RayError as err:  # the worker died, ...
        return CellFailed(type(err).__name__, str(err))
    return None
