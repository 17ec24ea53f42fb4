"""Grids end to end: expansion, a killed grid resuming, failures recorded, the report."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fedbench.errors import ConfigError, FedbenchError
from fedbench.grid import expand_cells, load_grid, value_label


def write_grid(tmp_path: Path, root: Path, axes: dict, rounds: int = 2) -> Path:
    grid = {
        "name": "tiny",
        "base": {
            "data": {"root": str(root), "download": False},
            "train": {"local_steps": 2, "batch_size": 32},
            "federation": {"num_clients": 5, "rounds": rounds, "final_rounds": 2},
            "wandb": {"mode": "disabled"},
        },
        "axes": axes,
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def grid_cli(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "fedbench.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


AXES = {"attack": ["pixel_pattern", "badnets"], "defense": ["fedavg", "median"],
        "attack.malicious_fraction": [0.2]}


def test_axes_expand_and_attack_arguments_skip_classes_without_them(tmp_path):
    cells = expand_cells({}, {"attack": ["none", "dba"], "defense": ["krum"],
                              "attack.malicious_fraction": [0.3, 0.2], "seed": [0, 1]}, 5, "g", tmp_path)
    names = sorted(c.cell_id for c in cells)
    assert names == ["dba-krum-mal0.2-s0", "dba-krum-mal0.2-s1", "dba-krum-mal0.3-s0", "dba-krum-mal0.3-s1",
                     "none-krum-s0", "none-krum-s1"], "attack none has no malicious fraction: merged"
    dba = next(c for c in cells if c.cell_id == "dba-krum-mal0.2-s1")
    assert dba.config["attack"] == {"class_path": "dba", "init_args": {"malicious_fraction": 0.2}}
    assert dba.config["seed"] == 1 and dba.config["output"]["resume"] is True


def test_dry_run_lists_cells_and_a_bad_cell_fails_before_training(tiny_root, tmp_path):
    path = write_grid(tmp_path, tiny_root, AXES)
    result = subprocess.run([sys.executable, "-m", "fedbench.cli", "grid", str(path), "--out",
                             str(tmp_path / "out"), "--dry-run"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.count("pending") == 4
    bad = write_grid(tmp_path, tiny_root, {**AXES, "defense": ["krum"], "attack.malicious_fraction": [0.4]})
    result = subprocess.run([sys.executable, "-m", "fedbench.cli", "grid", str(bad), "--out",
                             str(tmp_path / "bad")], capture_output=True, text=True)
    assert result.returncode == 2 and "n > 2f + 2" in result.stderr and "Traceback" not in result.stderr
    assert not list((tmp_path / "bad").glob("cells/*/summary.json"))


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL])
def test_a_killed_grid_resumes_without_redoing_or_losing_cells(tiny_root, tmp_path, how):
    path = write_grid(tmp_path, tiny_root, AXES, rounds=3)
    out = tmp_path / "out"
    # SIGINT as a terminal sends it: a shell starts background jobs with SIGINT ignored, and
    # a grid run from one (a CI script started with &) would inherit that and never stop.
    process = grid_cli("grid", str(path), "--out", str(out), start_new_session=True,
                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while time.time() < deadline and len(list(out.glob("cells/*/summary.json"))) < 1:
        time.sleep(0.2)
    os.killpg(process.pid, how)
    process.wait(timeout=60)
    finished = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("cells/*/summary.json")}
    assert 1 <= len(finished) < 4, "killed mid-grid"
    for summary in out.glob("cells/*/summary.json"):
        json.loads(summary.read_text())  # never half-written

    result = subprocess.run([sys.executable, "-m", "fedbench.cli", "grid", str(path), "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    for name in finished:
        assert f"{name}: finished earlier, skipped" in result.stdout
    after = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("cells/*/summary.json")}
    assert len(after) == 4
    assert all(after[name] == mtime for name, mtime in finished.items()), "finished cells are not redone"
    grid_summary = json.loads((out / "grid_summary.json").read_text())
    assert grid_summary["counts"]["finished"] == 4
    assert f"grid tiny: 4/4 done ({len(finished)} earlier), 0 failed, 0 running" in result.stdout
    assert f"running -> {out / 'cells'}" in result.stdout, "where each cell's output lives"


def test_a_failing_cell_is_recorded_and_the_grid_goes_on(tiny_root, tmp_path):
    path = write_grid(tmp_path, tiny_root, {"attack": ["badnets"], "defense": ["fedavg", "median"],
                                            "attack.malicious_fraction": [0.2]})
    grid = load_grid(path, str(tmp_path / "out"))
    # Sabotage one cell after validation: its data folder vanishes, so that cell's process fails.
    import fedbench.grid as grid_module

    broken = grid.cells[0]
    broken.config["data"]["root"] = str(tmp_path / "nowhere")
    original = grid_module.validate_cells
    grid_module.validate_cells = lambda g: None
    try:
        summary = grid_module.run_grid(grid, echo=lambda *_: None)
    finally:
        grid_module.validate_cells = original
    statuses = {c["cell"]: c["status"] for c in summary["cells"]}
    assert statuses[broken.cell_id] == "failed" and statuses[grid.cells[1].cell_id] == "finished"
    failure = json.loads((tmp_path / "out" / "cells" / broken.cell_id / "failure.json").read_text())
    assert "exit status 2" in failure["error"] and "data.root" in failure["detail"]


def test_report_writes_the_table_csv_and_plots(tiny_root, tmp_path):
    path = write_grid(tmp_path, tiny_root, {**AXES, "seed": [0, 1]})
    out = tmp_path / "out"
    subprocess.run([sys.executable, "-m", "fedbench.cli", "grid", str(path), "--out", str(out), "--isolate",
                    "false", "--set", "attack.poison_ratio=0.4"], check=True, capture_output=True, timeout=600)
    result = subprocess.run([sys.executable, "-m", "fedbench.cli", "report", str(out), "--out",
                             str(tmp_path / "report")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(open(tmp_path / "report" / "results.csv")))
    assert sorted((r["defense"], r["attack"]) for r in rows) == [
        ("fedavg", "badnets"), ("fedavg", "pixel_pattern"), ("median", "badnets"), ("median", "pixel_pattern")]
    assert all(r["seeds"] == "2" for r in rows)
    table = (tmp_path / "report" / "results.md").read_text()
    assert ("| defense | pixel_pattern A | pixel_pattern ASR non-target | pixel_pattern ASR all | pixel_pattern V "
            "| badnets A |") in table
    fedavg = {r["attack"]: r for r in rows if r["defense"] == "fedavg"}["pixel_pattern"]
    fedavg_cells = [s for s in (json.loads(p.read_text()) for p in (out / "cells").glob("*/summary.json"))
                    if s["defense"] == "fedavg" and s["attack"] == "pixel_pattern"]
    for key in ("ASR", "ASR_all"):
        expected = sum(c["final"][key] for c in fedavg_cells) / len(fedavg_cells)
        assert float(fedavg[f"{key}_mean"]) == pytest.approx(expected, abs=1e-3), key
    assert table.count("| fedavg |") == 1 and table.count("| median |") == 1
    assert "- `fedavg`: no arguments" in table
    # the command as run: a --set changes what the cells computed
    made_by = f"fedbench grid {path} --set attack.poison_ratio=0.4` then `fedbench report {out} --out {tmp_path / 'report'}"
    assert f"Made by: `{made_by}`" in table
    summaries = [json.loads(p.read_text()) for p in (out / "cells").glob("*/summary.json")]
    assert f"Run time: {sum(s['wall_time_s'] for s in summaries) / 60:.1f} min for 8 cells" in table
    pngs = sorted(p.name for p in (tmp_path / "report").glob("*.png"))
    assert len(pngs) == 3 and all((tmp_path / "report" / p).stat().st_size > 5000 for p in pngs)


def test_overrides_apply_everywhere_and_base_attack_arguments_carry_over(tmp_path):
    base = {"attack": {"class_path": "pixel_pattern", "init_args": {"poison_ratio": 0.4, "channels": "all"}}}
    cells = expand_cells(base, {"attack": ["badnets", "none"]}, 5, "g", tmp_path,
                         overrides={"federation.rounds": 3})
    badnets, none = cells
    assert badnets.cell_id == "badnets" and none.cell_id == "none"
    assert badnets.config["attack"]["init_args"] == {"poison_ratio": 0.4}, "channels is pixel_pattern's own"
    assert none.config["attack"]["init_args"] == {}
    assert badnets.config["federation"]["rounds"] == none.config["federation"]["rounds"] == 3


def test_parallel_cells_give_the_numbers_of_a_sequential_grid(tiny_root, tmp_path):
    path = write_grid(tmp_path, tiny_root, {"attack": ["badnets"], "defense": ["fedavg", "median", "krum"],
                                            "attack.malicious_fraction": [0.2]})
    spec = yaml.safe_load(path.read_text())
    spec["overrides"] = {"fabric.cpu_threads": 1}  # numbers independent of how many cells share the cores
    path.write_text(yaml.safe_dump(spec))
    finals = {}
    # both grids at once (one thread per cell: the numbers do not depend on what shares the cores)
    started = {jobs: subprocess.Popen([sys.executable, "-m", "fedbench.cli", "grid", str(path), "--out",
                                       str(tmp_path / f"jobs{jobs}"), "--jobs", str(jobs)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for jobs in (1, 2)}
    for jobs, process in started.items():
        stdout, stderr = process.communicate(timeout=600)
        out = tmp_path / f"jobs{jobs}"
        assert process.returncode == 0, stderr
        assert stdout.count("A=") == 3
        summary = json.loads((out / "grid_summary.json").read_text())
        assert json.loads((out / "grid.json").read_text())["jobs"] == jobs
        finals[jobs] = {c["cell"]: c["final"] for c in summary["cells"]}
    assert finals[1] == finals[2]


def test_jobs_must_be_a_positive_integer(tiny_root, tmp_path):
    path = write_grid(tmp_path, tiny_root, AXES)
    result = subprocess.run([sys.executable, "-m", "fedbench.cli", "grid", str(path), "--jobs", "0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "jobs=0: an integer >= 1" in result.stderr


def test_exclude_leaves_out_the_matching_combinations(tmp_path):
    axes = {"attack": ["none", "pixel_pattern"], "defense": ["fedavg", "krum", {"class_path": "sdfc"}], "seed": [0, 1]}
    cells = expand_cells({}, axes, 5, "g", tmp_path,
                         exclude=[{"attack": "none", "defense": "krum"}, {"attack": "none", "defense": "sdfc"}])
    kept = {(c.axes["attack"], value_label(c.axes["defense"]), c.axes["seed"]) for c in cells}
    every = {(a, value_label(d), s) for a in axes["attack"] for d in axes["defense"] for s in axes["seed"]}
    assert kept == every - {("none", d, s) for d in ("krum", "sdfc") for s in (0, 1)}
    assert len(cells) == 12 - 4


def test_an_exclude_entry_naming_no_axis_is_refused(tmp_path):
    with pytest.raises(ConfigError) as err:
        expand_cells({}, {"attack": ["none"]}, 5, "g", tmp_path, exclude=[{"defence": "krum"}])
    assert err.value.problems[0][0] == "grid.exclude"


def test_report_names_the_arguments_each_defense_ran_with():
    from fedbench.report import CellResult, defense_settings

    def cell(defense, args):
        return CellResult("c", "fashion_mnist", (), "pixel_pattern", defense, 0, {}, None, [], defense_args=args)

    text = defense_settings([cell("sdfc", {"estimator": "published", "calibration_lambda": 1.0}),
                             cell("krum", {"f": None}), cell("krum", {"f": 2})], ["sdfc", "krum"])
    assert "- `sdfc`: calibration_lambda=1.0, estimator=published\n" in text
    assert "- `krum`: f=2; f=None (cells differ)" in text


def test_an_override_inside_the_defense_reaches_every_cell_whose_defense_takes_it(tmp_path):
    cells = expand_cells({}, {"defense": ["fedavg", "sdfc", {"class_path": "sdfc", "init_args": {"mode": "full"}}]},
                         5, "g", tmp_path, overrides={"defense.estimator": "empirical", "federation.rounds": 3})
    by_label = {value_label(c.axes["defense"]): c.config for c in cells}
    assert by_label["fedavg"]["defense"] == {"class_path": "fedavg", "init_args": {}}
    assert by_label["sdfc"]["defense"]["init_args"] == {"estimator": "empirical"}
    assert by_label["sdfc_mode_full"]["defense"]["init_args"] == {"mode": "full", "estimator": "empirical"}
    assert all(c["federation"]["rounds"] == 3 for c in by_label.values())


def test_an_override_no_cell_can_take_is_refused_before_any_cell_runs(tmp_path):
    with pytest.raises(ConfigError) as err:
        expand_cells({}, {"defense": ["fedavg", "krum"]}, 5, "g", tmp_path, overrides={"defense.estimator": "x"})
    assert err.value.problems[0][0] == "grid.overrides.defense.estimator"
    assert "none of them takes 'estimator'" in str(err.value)


def test_set_and_cells_narrow_a_grid_from_the_command_line(tmp_path):
    from fedbench.grid import select_cells

    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({"name": "g", "axes": {"attack": ["none", "badnets"], "defense": ["fedavg", "sdfc"],
                                                          "seed": [0, 1, 2]}}))
    grid = load_grid(path, str(tmp_path / "out"), ["axes.seed=[1]", "federation.rounds=2", "defense.estimator=empirical"])
    assert sorted(c.cell_id for c in grid.cells) == ["badnets-fedavg-s1", "badnets-sdfc-s1", "none-fedavg-s1",
                                                    "none-sdfc-s1"]
    assert all(c.config["federation"]["rounds"] == 2 for c in grid.cells)
    select_cells(grid, ["*-sdfc-*"])
    assert [c.cell_id for c in grid.cells] == ["none-sdfc-s1", "badnets-sdfc-s1"]
    assert grid.cells[0].config["defense"]["init_args"]["estimator"] == "empirical"
    with pytest.raises(ConfigError):
        select_cells(grid, ["nothing-*"])
    with pytest.raises(ConfigError):
        load_grid(path, None, ["no_equals_sign"])


def write_cell(grid_dir, name, device, code, torch_version="2.14.1", asr=50.0, non_finite_rounds=()):
    import json as json_

    cell = grid_dir / "cells" / name
    cell.mkdir(parents=True)
    records = [{"round": 0, "clean_acc": 60.0, "asr": asr, "asr_all": asr}]
    (cell / "metrics.jsonl").write_text("\n".join(json_.dumps(r) for r in records) + "\n")
    (cell / "summary.json").write_text(json_.dumps({
        "dataset": "fashion_mnist", "attack": "pixel_pattern", "defense": "fedavg", "seed": int(name[-1]),
        "final": {"A": 60.0, "ASR": asr}, "detection": None, "wall_time_s": 10.0, "device": device,
        "code": code, "versions": {"torch": torch_version}, "config": {},
        "non_finite_aggregate_rounds": list(non_finite_rounds)}))


def test_the_run_time_of_a_cell_resumed_without_its_earlier_time_is_the_sum_of_its_rounds(tmp_path):
    import json as json_

    from fedbench.report import collect, run_time

    write_cell(tmp_path / "g", "pixel_pattern-fedavg-s0", "cpu", "abc")  # wall time 10 s, one round
    metrics = tmp_path / "g" / "cells" / "pixel_pattern-fedavg-s0" / "metrics.jsonl"
    metrics.write_text("".join(json_.dumps({"round": r, "time": {"round": 30.0}}) + "\n" for r in range(4)))
    assert run_time(collect(tmp_path / "g"), jobs=1).startswith("Run time: 2.0 min for 1 cells"), "4 x 30 s"


def test_the_report_marks_cells_whose_aggregate_was_refused_and_says_when(tmp_path):
    from fedbench.report import make_report

    write_cell(tmp_path / "g", "pixel_pattern-fedavg-s0", "cpu", "abc", asr=40.0)
    write_cell(tmp_path / "g", "pixel_pattern-fedavg-s1", "cpu", "abc", asr=60.0, non_finite_rounds=(0,))
    make_report(tmp_path / "g", tmp_path / "out")
    lines = (tmp_path / "out" / "results.md").read_text().splitlines()
    row = next(line for line in lines if line.startswith("| fedavg "))
    assert row.split(" | ")[1:3] == ["60.0±0.0†", "50.0±10.0†"], "A of both seeds, ASR (40 + 60) / 2, marked"
    assert "- fedavg / pixel_pattern: seed 1: 1 of 1 rounds, from round 0" in lines


def test_the_report_names_machine_code_and_versions_and_warns_when_cells_mix_them(tmp_path):
    from fedbench.report import make_report

    same = tmp_path / "same"
    for seed in (0, 1):
        write_cell(same, f"pixel_pattern-fedavg-s{seed}", "cpu:x86_64 x1 threads", "abc123")
    text = (tmp_path / "out1").joinpath("results.md")
    make_report(same, tmp_path / "out1")
    body = text.read_text()
    assert "Machine: cpu:x86_64 x1 threads. Code: abc123. Packages: torch 2.14.1." in body
    assert "Note:" not in body

    mixed = tmp_path / "mixed"
    write_cell(mixed, "pixel_pattern-fedavg-s0", "cpu:x86_64 x1 threads", "abc123")
    write_cell(mixed, "pixel_pattern-fedavg-s1", "cuda:NVIDIA H100", "def456+dirty")
    make_report(mixed, tmp_path / "out2")
    body = (tmp_path / "out2" / "results.md").read_text()
    assert "Machine: cpu:x86_64 x1 threads (1 cell); cuda:NVIDIA H100 (1 cell)." in body
    assert "Code: abc123 (1 cell); def456+dirty (1 cell)." in body
    assert "ran on different devices and code versions" in body


def test_a_run_records_its_git_commit(tmp_path):
    import subprocess

    from fedbench.engine import code_revision

    expected = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    if not expected:
        pytest.skip("not a git checkout: runs record code = None")
    assert code_revision().split("+")[0] == expected


def test_grid_progress_counts_and_estimates_by_hand():
    from fedbench.grid import GridProgress

    progress = GridProgress("g", total=10, jobs=2)
    for cell in ("a", "b"):
        progress.ended(cell, None, earlier=True)
    progress.started("c")
    progress.started("d")
    progress.started("e")
    assert progress.line() == "grid g: 2/10 done (2 earlier), 0 failed, 3 running"
    progress.ended("c", 60.0)
    progress.ended("d", 180.0, failed=True)
    # 6 cells left, mean 120 s over the cells run now, 2 at a time: 6 * 120 / 2 = 360 s
    assert progress.line() == "grid g: 3/10 done (2 earlier), 1 failed, 1 running; about 6 min left"


def test_the_report_logs_one_wandb_summary_run_of_the_whole_grid_offline(tmp_path, monkeypatch):
    from fedbench.report import make_report

    grid = tmp_path / "grid"
    for seed, asr in ((0, 40.0), (1, 60.0)):
        write_cell(grid, f"pixel_pattern-fedavg-s{seed}", "cpu:x86_64 x1 threads", "abc123", asr=asr)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    report = make_report(grid, tmp_path / "out", wandb_mode="offline")
    run = report["wandb"]
    assert run is not None and run.parent == grid / "wandb" and list(run.glob("run-*.wandb")), "a complete offline run"
    media = run / "files" / "media"
    table = json.loads(next((media / "table").glob("results_*.table.json")).read_text())
    rows = {row[table["columns"].index("cell")]: dict(zip(table["columns"], row)) for row in table["data"]}
    assert set(rows) == {"pixel_pattern-fedavg-s0", "pixel_pattern-fedavg-s1"}, "one row per finished cell"
    assert rows["pixel_pattern-fedavg-s1"]["ASR"] == 60.0 and rows["pixel_pattern-fedavg-s0"]["A"] == 60.0
    assert rows["pixel_pattern-fedavg-s0"]["code"] == "abc123"
    assert len(list((media / "images" / "report").glob("*.png"))) == len(report["images"]) == 3
    curve = json.loads(next((media / "table" / "ASR").glob("fedavg_table_*.table.json")).read_text())
    assert curve["data"] == [[1, "pixel_pattern", 50.0]], "ASR over rounds, mean over the two seeds"
    assert make_report(grid, tmp_path / "out2", wandb_mode="disabled")["wandb"] is None


def test_attacks_without_a_trigger_get_accuracy_columns_only(tmp_path):
    import json as json_

    from fedbench.report import make_report

    grid = tmp_path / "grid"
    write_cell(grid, "pixel_pattern-fedavg-s0", "cpu", "abc")
    write_cell(grid, "sign_flip-fedavg-s0", "cpu", "abc", asr=None)
    summary = grid / "cells" / "sign_flip-fedavg-s0" / "summary.json"
    summary.write_text(summary.read_text().replace('"attack": "pixel_pattern"', '"attack": "sign_flip"'))
    make_report(grid, tmp_path / "out", wandb_mode="disabled")
    header = next(line for line in (tmp_path / "out" / "results.md").read_text().splitlines()
                  if line.startswith("| defense"))
    assert "sign_flip A" in header and "sign_flip ASR" not in header and "pixel_pattern ASR non-target" in header
    assert json_.loads(summary.read_text())["final"]["ASR"] is None


def write_summary(grid_dir, attack, defense, seed, accuracy, config):
    import json as json_

    cell = grid_dir / "cells" / f"{attack}-{defense}-s{seed}"
    cell.mkdir(parents=True)
    (cell / "cell.json").write_text(json_.dumps({"axes": {"attack": attack, "defense": defense, "seed": seed}}))
    (cell / "metrics.jsonl").write_text(json_.dumps({"round": 0, "clean_acc": accuracy, "asr": None}) + "\n")
    (cell / "summary.json").write_text(json_.dumps({
        "dataset": "fashion_mnist", "attack": attack, "defense": defense, "seed": seed,
        "final": {"A": accuracy, "ASR": None}, "detection": None, "config": config}))


def test_the_accuracy_drop_comes_seed_by_seed_from_a_reference_grid_of_the_same_protocol(tmp_path):
    from fedbench.report import make_report

    protocol = {"seed": 0, "federation": {"rounds": 10}, "train": {"lr": 0.05}, "attack": {}, "defense": {}}
    byzantine, quick = tmp_path / "byzantine", tmp_path / "quick"
    for seed, clean, attacked in [(0, 80.0, 50.0), (1, 70.0, 60.0)]:  # drops 30 and 10: mean 20, std 10
        write_summary(quick, "none", "median", seed, clean, protocol)
        write_summary(byzantine, "sign_flip", "median", seed, attacked, protocol)
    write_summary(quick, "none", "krum", 0, 99.0, protocol)  # a defense this grid did not run: left out
    write_summary(quick, "pixel_pattern", "median", 0, 1.0, protocol)  # attacked reference cells: ignored
    report = make_report(byzantine, tmp_path / "out", wandb_mode="disabled", reference=quick)
    row = next(r for r in report["rows"] if r["attack"] == "sign_flip")
    assert row["A_drop_mean"] == pytest.approx(20.0) and row["A_drop_std"] == pytest.approx(10.0)
    text = (tmp_path / "out" / "results.md").read_text()
    assert "| defense | none A | sign_flip A | sign_flip A drop |" in text
    assert "| median | 75.0±5.0 | 55.0±5.0 | 20.0±10.0 |" in text and "| krum" not in text

    other = tmp_path / "other"
    write_summary(other, "none", "median", 0, 80.0, {**protocol, "train": {"lr": 0.01}})
    with pytest.raises(FedbenchError, match=r"another protocol \(train.lr: 0.05 here, 0.01 there\)"):
        make_report(byzantine, tmp_path / "out2", wandb_mode="disabled", reference=other)


def test_a_reference_grid_that_predates_a_config_key_ran_with_that_keys_default(tmp_path):
    """A key added after the reference grid ran (its cells lack it) means the default
    (``train.drop_last``: true); a value other than the default is another protocol. How
    training is executed (``train.cohort``, ``train.compile``, ``train.cohort_convolution``:
    equal to sequential training to float rounding) is not."""
    from fedbench.report import make_report

    older = {"seed": 0, "train": {"lr": 0.05}, "attack": {}, "defense": {}}
    quick = tmp_path / "quick"
    write_summary(quick, "none", "median", 0, 80.0, older)
    for name, train in (("default", {"drop_last": True}),
                        ("cohort", {"cohort": True, "compile": "default", "cohort_convolution": "matmul"}),
                        ("auto", {"cohort": "auto"}), ("sequential", {"cohort": False})):
        grid = tmp_path / name
        write_summary(grid, "sign_flip", "median", 0, 50.0, {**older, "train": {"lr": 0.05, **train}})
        report = make_report(grid, tmp_path / f"out_{name}", wandb_mode="disabled", reference=quick)
        assert next(r for r in report["rows"] if r["attack"] == "sign_flip")["A_drop_mean"] == pytest.approx(30.0)

    other = tmp_path / "other"
    write_summary(other, "sign_flip", "median", 0, 50.0, {**older, "train": {"lr": 0.05, "drop_last": False}})
    with pytest.raises(FedbenchError, match=r"another protocol \(train.drop_last: False here, None there\)"):
        make_report(other, tmp_path / "out2", wandb_mode="disabled", reference=quick)