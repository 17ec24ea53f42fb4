"""``jobs: auto``: how many grid cells this machine runs at once, packed by CPU cores and,
when the cells train on a GPU, by that GPU's free memory.

- CPU: ``cores // threads per cell`` (a cell's pinned ``fabric.cpu_threads``, else 1).
- GPU: ``free memory // gpu_memory_per_cell``, every cell on the first visible GPU (the
  processes share it; the local launcher does not spread cells over several GPUs: use
  ``--launcher ray --gpus-per-cell`` on a multi-GPU machine). The default 1.5 GB per cell
  is what the Fashion-MNIST paper cells (simple_cnn) took: seven of them used 8.2 GB of an
  H200, CUDA contexts included. A ResNet-18 cell needs more: set it.
The smaller of the two wins. Free memory is read with ``nvidia-smi`` so that the grid's
own process holds no CUDA context (about 0.5 GB) while its cells run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Callable, Sequence

GPU_MEMORY_PER_CELL_GB = 1.5
GPU_ACCELERATORS = ("auto", "cuda", "gpu")


def free_gpu_memory_gb() -> float | None:
    """Free memory of the first visible GPU in GB (2^30 bytes), from nvidia-smi; None when
    there is no nvidia-smi or it fails."""
    if shutil.which("nvidia-smi") is None:
        return None
    first = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0].strip() or "0"
    try:
        result = subprocess.run(["nvidia-smi", "--query-gpu=memory.free", "--format=csv,noheader,nounits",
                                 "-i", first], capture_output=True, text=True, timeout=60)
        return float(result.stdout.split()[0]) / 1024 if result.returncode == 0 else None
    except (subprocess.TimeoutExpired, ValueError, IndexError):
        return None


def cells_use_gpu(configs: Sequence[dict]) -> bool:
    """Whether any cell asks for an accelerator a GPU serves (``auto`` does when one is there)."""
    return any(str((c.get("fabric") or {}).get("accelerator", "auto")) in GPU_ACCELERATORS for c in configs)


def auto_jobs(configs: Sequence[dict], gpu_memory_per_cell: float = GPU_MEMORY_PER_CELL_GB,
              cores: int | None = None, free_gpu: Callable[[], float | None] = free_gpu_memory_gb) -> tuple[int, str]:
    """``(jobs, why)`` for the cells' ``configs`` on this machine."""
    cores = cores or os.cpu_count() or 1
    threads = max(int((c.get("fabric") or {}).get("cpu_threads") or 1) for c in configs) if configs else 1
    by_cpu = max(1, cores // threads)
    why = f"{cores} cores / {threads} thread(s) per cell = {by_cpu}"
    free = free_gpu() if cells_use_gpu(configs) else None
    if free is None:
        return by_cpu, why
    by_gpu = max(1, int(free // gpu_memory_per_cell))
    why += f"; {free:.1f} GB free GPU memory / {gpu_memory_per_cell:g} GB per cell = {by_gpu}"
    return min(by_cpu, by_gpu), why
