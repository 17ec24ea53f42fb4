"""``fedbench grid --launcher ray`` on a local Ray cluster of 2 CPU workers: the numbers of
the local grid, a failing cell recorded while the others finish, a re-run that skips."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import yaml

from test_grid import write_grid

ray = pytest.importorskip("ray", reason="SKIPPED LOUDLY: Ray is not installed (pip install -e '.[ray]')")

AXES = {"attack": ["badnets"], "defense": ["fedavg", "median"], "attack.malicious_fraction": [0.2], "seed": [0, 1]}


@pytest.fixture(scope="module")
def local_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def report_rows(grid_dir, out):
    from fedbench.report import make_report

    make_report(grid_dir, out, wandb_mode="disabled")
    return list(csv.DictReader(open(out / "results.csv")))


def sabotaged_grid(path, out, tmp_path):
    """The grid with its first cell's data folder gone after validation: that cell's process fails."""
    from fedbench.grid import load_grid

    grid = load_grid(path, str(out))
    grid.cells[0].config["data"]["root"] = str(tmp_path / "nowhere")
    return grid


def test_ray_grid_equals_the_local_grid_records_failures_and_skips_on_rerun(local_cluster, tiny_root, tmp_path,
                                                                           monkeypatch):
    import fedbench.grid as grid_module
    from fedbench.ray_launcher import RayOptions

    path = write_grid(tmp_path, tiny_root, AXES)
    spec = yaml.safe_load(path.read_text())
    spec["overrides"] = {"fabric.cpu_threads": 1}  # the same numbers on any worker
    path.write_text(yaml.safe_dump(spec))
    monkeypatch.setattr(grid_module, "validate_cells", lambda grid: None)

    local = grid_module.run_grid(sabotaged_grid(path, tmp_path / "local", tmp_path), isolate=False,
                                 echo=lambda *_: None)
    assert local["counts"] == {"finished": 3, "failed": 1, "interrupted": 0, "pending": 0}

    lines: list[str] = []
    grid = sabotaged_grid(path, tmp_path / "ray", tmp_path)
    summary = grid_module.run_grid(grid, echo=lines.append, launcher="ray", ray_options=RayOptions())
    statuses = {c["cell"]: c["status"] for c in summary["cells"]}
    assert statuses[grid.cells[0].cell_id] == "failed", lines
    assert all(statuses[c.cell_id] == "finished" for c in grid.cells[1:]), "the other cells finish"
    failure = json.loads((tmp_path / "ray" / "cells" / grid.cells[0].cell_id / "failure.json").read_text())
    assert "exit status 2" in failure["error"] and "data.root" in failure["detail"], "the cell's own error"
    assert json.loads((tmp_path / "ray" / "grid.json").read_text())["launcher"] == "ray"
    ray_rows, local_rows = (report_rows(tmp_path / name, tmp_path / f"report_{name}") for name in ("ray", "local"))
    assert ray_rows == local_rows, "the Ray grid's results.csv equals the local grid's"

    again: list[str] = []
    grid_module.run_grid(grid_module.load_grid(path, str(tmp_path / "ray")), echo=again.append, launcher="ray")
    assert sum("finished earlier, skipped" in line for line in again) == 3
    assert sum(": queued ->" in line for line in again) == 1, "only the failed cell runs again"


def test_an_unknown_launcher_is_named_before_any_cell_runs(tiny_root, tmp_path):
    path = write_grid(tmp_path, tiny_root, AXES)
    result = subprocess.run([sys.executable, "-m", "fedbench.cli", "grid", str(path), "--out", str(tmp_path / "o"),
                             "--launcher", "slurm"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "launcher='slurm'" in result.stderr and "one of: local, ray" in result.stderr
    assert not (tmp_path / "o" / "cells").exists()
