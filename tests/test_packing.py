"""``jobs: auto``: cells at once from the cores and the GPU's free memory."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from fedbench.packing import auto_jobs, free_gpu_memory_gb
from test_grid import write_grid

GPU_CELL = {"fabric": {"accelerator": "auto"}}
CPU_CELL = {"fabric": {"accelerator": "cpu", "cpu_threads": 2}}


def test_the_gpu_memory_bounds_the_cells_when_it_is_the_scarcer():
    # 10 GB free / 1.5 GB per cell = 6 (6.67 rounded down); 16 cores would allow 16
    jobs, why = auto_jobs([GPU_CELL] * 20, 1.5, cores=16, free_gpu=lambda: 10.0)
    assert jobs == 6
    assert "10.0 GB free" in why and "16 cores" in why


def test_the_cores_bound_the_cells_when_they_are_the_scarcer():
    jobs, _ = auto_jobs([GPU_CELL] * 20, 1.5, cores=4, free_gpu=lambda: 100.0)
    assert jobs == 4  # 100 / 1.5 = 66 cells would fit the GPU


def test_cpu_cells_never_ask_the_gpu_and_pinned_threads_divide_the_cores():
    def no_gpu_question():
        raise AssertionError("a CPU-only grid asked for GPU memory")

    jobs, why = auto_jobs([CPU_CELL] * 5, 1.5, cores=8, free_gpu=no_gpu_question)
    assert jobs == 4 and "2 thread(s) per cell" in why


def test_without_a_gpu_the_cores_alone_decide_and_at_least_one_cell_runs():
    assert auto_jobs([GPU_CELL], 1.5, cores=3, free_gpu=lambda: None)[0] == 3
    assert auto_jobs([GPU_CELL], 1.5, cores=3, free_gpu=lambda: 0.5)[0] == 1  # less than one cell's memory


def test_free_memory_is_read_from_nvidia_smi_for_the_first_visible_gpu(tmp_path, monkeypatch):
    fake = tmp_path / "nvidia-smi"
    fake.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'args'}\necho 81559\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    assert free_gpu_memory_gb() == pytest.approx(81559 / 1024)  # MiB -> GB
    assert (tmp_path / "args").read_text().split()[-2:] == ["-i", "3"]


def test_jobs_auto_runs_a_grid_and_records_the_jobs_it_chose(tiny_root, tmp_path):
    path = write_grid(tmp_path, tiny_root, {"attack": ["none"], "defense": ["fedavg", "median"],
                                            "fabric.accelerator": ["cpu"]})
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "fedbench.cli", "grid", str(path), "--out", str(out),
                             "--jobs", "auto"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    expected = os.cpu_count() or 1  # CPU cells, 1 thread each: one per core
    assert f"jobs auto = {expected}" in result.stdout
    assert json.loads((out / "grid.json").read_text())["jobs"] == expected
    assert result.stdout.count("A=") == 2


@pytest.mark.parametrize("args, field", [(["--jobs", "many"], "jobs"),
                                         (["--jobs", "auto", "--gpu-memory-per-cell", "0"], "gpu_memory_per_cell")])
def test_bad_jobs_options_get_one_line_naming_the_field(tiny_root, tmp_path, args, field):
    path = write_grid(tmp_path, tiny_root, {"attack": ["none"], "defense": ["fedavg"]})
    result = subprocess.run([sys.executable, "-m", "fedbench.cli", "grid", str(path), *args],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert field in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
