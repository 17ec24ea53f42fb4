"""Helpers shared by the perf scripts: timing and Markdown tables."""

from __future__ import annotations

import time
from typing import Callable

import torch


def timed(fn: Callable[[], object], repeat: int = 3, warmup: int = 1, sync: torch.device | None = None) -> float:
    """Best-of-``repeat`` wall seconds of ``fn`` after ``warmup`` calls."""
    def wait():
        if sync is not None and sync.type == "cuda":
            torch.cuda.synchronize(sync)

    for _ in range(warmup):
        fn()
    wait()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        wait()
        best = min(best, time.perf_counter() - start)
    return best


def in_fresh_process(function: Callable[..., object], *args: object) -> object:
    """``function(*args)`` in a newly spawned Python process, its result returned: nothing
    one measurement leaves in torch's process (cuDNN's plan cache, which does not key on
    the autotuner's switch; compiled graphs and their CUDA graphs; process-wide switches)
    reaches the next. ``function`` must be importable by name."""
    import concurrent.futures
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(function, *args).result()


def table(header: list[str], rows: list[list[object]]) -> str:
    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.3f}" if value < 100 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    import platform

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"CPU {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def cuda_graph_note(mode: str | None) -> str:
    """Under ``reduce-overhead`` on a GPU, how many compiled graphs ran without their CUDA
    graph (inductor's count; its log says why: 0 means every compiled step could replay
    one) and how many CUDA graphs were recorded (:func:`count_cuda_graph_recordings`: a
    graph that recorded again every round, because a tensor it keeps moved, shows here as
    about one recording per graph and round; every measured row builds new runs, whose
    first round records its graphs)."""
    if mode != "reduce-overhead" or not torch.cuda.is_available():
        return ""
    from torch._dynamo.utils import counters

    return (f"\n\nCUDA graphs skipped (inductor's cudagraph_skips): {counters['inductor']['cudagraph_skips']}; "
            f"recorded: {RECORDINGS[0]}; cohort rounds trained: {ROUNDS[0]}\n")


RECORDINGS, ROUNDS = [0], [0]


def count_cuda_graph_recordings() -> None:
    """From now on, count the CUDA graphs inductor's graph trees record (into ``RECORDINGS``)
    and the cohort rounds trained (into ``ROUNDS``)."""
    from torch._inductor import cudagraph_trees

    from fedbench.cohort import CohortTrainer

    def counting(original, counter):
        def call(*args, **kwargs):
            counter[0] += 1
            return original(*args, **kwargs)
        return call

    manager = cudagraph_trees.CUDAGraphTreeManager
    manager.record_function = counting(manager.record_function, RECORDINGS)
    CohortTrainer.train = counting(CohortTrainer.train, ROUNDS)
