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
    """Under ``reduce-overhead``, how many compiled graphs ran without their CUDA graph
    (inductor's count; its log says why): 0 means every compiled step replayed one."""
    if mode != "reduce-overhead" or not torch.cuda.is_available():
        return ""
    from torch._dynamo.utils import counters

    return f"\n\nCUDA graphs skipped (inductor's cudagraph_skips): {counters['inductor']['cudagraph_skips']}\n"
