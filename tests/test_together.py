"""Cross-cell cohorts: runs trained together equal the same runs trained alone."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from attacks.badnets import BadNets
from attacks.pixel_pattern import PixelPattern
from conftest import tiny_experiment, wandb_exit_codes, wandb_history, wandb_records, wandb_summary
from defenses.median import Median
from defenses.sdfc import SDFC
from fedbench.client import LocalTrainConfig
from fedbench.engine import FederatedRun
from fedbench.errors import FedbenchError
from fedbench.experiment import FederationConfig
from fedbench.together import run_together

TRAIN = LocalTrainConfig(local_epochs=1, local_steps=None, batch_size=32, cohort=True)


def two_cells(tiny_root, out, train=TRAIN):
    """SDFC against the pixel pattern (seed 0, 2 rounds) and the median against BadNets
    (seed 1, 3 rounds): other attacks, defenses, seeds, client hooks and lengths."""
    return [
        tiny_experiment(tiny_root, out / "a", attack=PixelPattern(malicious_fraction=0.4), defense=SDFC(), train=train,
                        federation=FederationConfig(num_clients=5, rounds=2, final_rounds=1)),
        tiny_experiment(tiny_root, out / "b", attack=BadNets(malicious_fraction=0.2), defense=Median(), train=train,
                        seed=1, federation=FederationConfig(num_clients=5, rounds=3, final_rounds=1)),
    ]


def test_runs_trained_together_equal_the_same_runs_alone(tiny_root, tmp_path):
    alone = [FederatedRun(exp) for exp in two_cells(tiny_root, tmp_path / "alone")]
    alone_summaries = [run.run() for run in alone]
    together = [FederatedRun(exp) for exp in two_cells(tiny_root, tmp_path / "together")]
    cohort_sizes = []
    for name, run in zip("ab", together):
        def counting(jobs, name=name, train=run.cohort_trainer.train):
            cohort_sizes.append((name, len(jobs)))
            return train(jobs)

        run.cohort_trainer.train = counting
    summaries = run_together(together)
    assert cohort_sizes == [("a", 10), ("a", 10), ("b", 5)], "both runs' clients in one cohort; b's last round alone"
    for run, reference, summary, reference_summary in zip(together, alone, summaries, alone_summaries):
        gap = float((run.global_params - reference.global_params).abs().max() / reference.global_params.abs().max())
        assert gap < 1e-5, (run.exp.run_name, gap)
        assert len(run.records) == len(reference.records) == reference.exp.federation.rounds
        for mine, theirs in zip(run.records, reference.records):
            assert mine["local_steps"] == theirs["local_steps"] and mine["clients"] == theirs["clients"]
            assert mine["clean_acc"] == pytest.approx(theirs["clean_acc"], abs=0.1)
            assert mine["asr"] == pytest.approx(theirs["asr"], abs=0.1)
            assert mine["weights"] == pytest.approx(theirs["weights"], rel=1e-3, abs=1e-6)
        assert (run.exp.run_dir / "summary.json").exists() and summary["final"]["A"] == pytest.approx(
            reference_summary["final"]["A"], abs=0.1)


def test_runs_that_cannot_share_a_cohort_are_refused_naming_what_differs(tiny_root, tmp_path):
    first, second = two_cells(tiny_root, tmp_path)
    second = dataclasses.replace(second, train=dataclasses.replace(TRAIN, lr=0.1))
    with pytest.raises(FedbenchError, match="must share train"):
        run_together([FederatedRun(first), FederatedRun(second)])
    sequential = dataclasses.replace(TRAIN, cohort=False)
    with pytest.raises(FedbenchError, match="train.cohort to true or auto"):
        run_together([FederatedRun(exp) for exp in two_cells(tiny_root, tmp_path / "s", train=sequential)])
    assert not list(tmp_path.rglob("metrics.jsonl")), "refused before any round"


def packed_grid(tiny_root, tmp_path, axes, **base):
    """A tiny grid file (train.cohort left at auto: sequential on this CPU alone, one cohort packed)."""
    import yaml
    from test_grid import write_grid

    path = write_grid(tmp_path, tiny_root, axes)
    grid = yaml.safe_load(path.read_text())
    grid["base"].update(base)
    path.write_text(yaml.safe_dump(grid))
    return path


AXES = {"attack": ["pixel_pattern", "badnets"], "defense": ["fedavg", "median"], "attack.malicious_fraction": [0.2]}


def test_a_grid_packed_in_one_process_equals_the_same_grid_unpacked(tiny_root, tmp_path):
    from fedbench.grid import load_grid, run_grid
    from fedbench.results import read_summary

    path = packed_grid(tiny_root, tmp_path, {**AXES, "defense": ["median", "fedavg"], "attack": ["badnets"]})
    unpacked = run_grid(load_grid(path, str(tmp_path / "unpacked")), echo=lambda *_: None)
    lines: list[str] = []
    packed = run_grid(load_grid(path, str(tmp_path / "packed")), echo=lines.append, cells_per_process=2)
    assert unpacked["counts"]["finished"] == packed["counts"]["finished"] == 2
    pointers = [p for p in (tmp_path / "packed" / "cells").glob("*/log.txt")
                if p.read_text().startswith("trained in one process with")]
    assert len(pointers) == 1, "2 cells in 1 process: the second cell names the pack's log"
    for cell in (tmp_path / "unpacked" / "cells").iterdir():
        alone, together = read_summary(cell), read_summary(tmp_path / "packed" / "cells" / cell.name)
        for key in ("A", "ASR"):
            assert together["final"][key] == pytest.approx(alone["final"][key], abs=0.1), (cell.name, key)
    again: list[str] = []
    run_grid(load_grid(path, str(tmp_path / "packed")), echo=again.append, cells_per_process=2)
    assert sum("finished earlier, skipped" in line for line in again) == 2


def test_packing_refuses_cells_that_cannot_share_a_process(tiny_root, tmp_path, capsys):
    import yaml

    from fedbench.errors import ConfigError
    from fedbench.grid import load_grid, run_grid

    path = packed_grid(tiny_root, tmp_path, AXES)
    grid = yaml.safe_load(path.read_text())
    for change, expected in (({"train": {**grid["base"]["train"], "cohort": False}}, "train.cohort=false"),
                             ({"fabric": {"devices": 2}}, "fabric.devices=1"),
                             ({"fabric": {"precision": "16-mixed"}}, "16-mixed")):
        path.write_text(yaml.safe_dump({**grid, "base": {**grid["base"], **change}}))
        with pytest.raises(ConfigError, match="cells_per_process") as refused:
            run_grid(load_grid(path, str(tmp_path / "out")), echo=lambda *_: None, cells_per_process=2)
        assert expected in str(refused.value)
    with pytest.raises(ConfigError, match="an integer >= 1"):
        run_grid(load_grid(path, str(tmp_path / "out")), echo=lambda *_: None, cells_per_process=0)
    with pytest.raises(ConfigError, match="with --launcher ray"):
        run_grid(load_grid(path, str(tmp_path / "out")), echo=lambda *_: None, cells_per_process=2, launcher="ray")
    assert not (tmp_path / "out" / "cells").exists(), "refused before any cell ran"
    from fedbench.grid import grid_command

    for flags in (["--launcher", "ray", "--cells-per-process", "2"], ["--cells-per-process", "0"]):
        assert grid_command([str(path), "--out", str(tmp_path / "out"), "--dry-run", *flags]) == 2, flags
    err = capsys.readouterr().err
    assert "with --launcher ray" in err and "an integer >= 1" in err, "a dry run refuses them as a run does"
    path.write_text(yaml.safe_dump(grid))  # packable again: a dry run says which process takes each cell
    assert grid_command([str(path), "--out", str(tmp_path / "out"), "--dry-run", "--cells-per-process", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    cell_ids = [cell.cell_id for cell in load_grid(path, str(tmp_path / "out")).cells]
    assert lines[:-1] == [f"pending     {cell_id}  process {1 + index // 3}" for index, cell_id in enumerate(cell_ids)]
    assert lines[-1] == f"4 cells in 2 processes of up to 3 -> {tmp_path / 'out'}"


def test_a_failing_pack_is_recorded_and_the_other_packs_go_on(tiny_root, tmp_path):
    import json

    import fedbench.grid as grid_module

    path = packed_grid(tiny_root, tmp_path, {"attack": ["badnets"], "defense": ["fedavg", "median", "trimmed_mean"],
                                             "attack.malicious_fraction": [0.2]})
    grid = grid_module.load_grid(path, str(tmp_path / "out"))
    broken = grid.cells[0]  # its data folder vanishes after validation: its pack's process fails
    broken.config["data"]["root"] = str(tmp_path / "nowhere")
    original = grid_module.validate_cells
    grid_module.validate_cells = lambda g: None
    try:
        summary = grid_module.run_grid(grid, echo=lambda *_: None, cells_per_process=2)
    finally:
        grid_module.validate_cells = original
    statuses = {c["cell"]: c["status"] for c in summary["cells"]}
    assert statuses == {broken.cell_id: "failed", grid.cells[1].cell_id: "finished", grid.cells[2].cell_id: "finished"}
    failure = json.loads((tmp_path / "out" / "cells" / broken.cell_id / "failure.json").read_text())
    assert "exit status 2" in failure["error"] and "data.root" in failure["detail"]


def test_a_run_that_finishes_first_keeps_its_summary_when_a_later_round_of_the_pack_fails(tiny_root, tmp_path):
    short, long = [FederatedRun(exp) for exp in two_cells(tiny_root, tmp_path)]
    close_round = long.close_round

    def fails_in_round_2(opened, results):
        if opened.index == 2:
            raise RuntimeError("a fault in the longer run's last round")
        return close_round(opened, results)

    long.close_round = fails_in_round_2
    with pytest.raises(RuntimeError, match="a fault"):
        run_together([short, long])
    assert (short.exp.run_dir / "summary.json").exists(), "written when its last round was done"
    assert not (long.exp.run_dir / "summary.json").exists()


def test_a_cell_that_failed_before_is_retried_in_a_pack_of_its_own(tiny_root, tmp_path):
    from fedbench.cell_packs import pack_cells
    from fedbench.grid import load_grid

    path = packed_grid(tiny_root, tmp_path, {"attack": ["badnets"], "defense": ["fedavg", "median", "trimmed_mean"],
                                             "attack.malicious_fraction": [0.2]})
    grid = load_grid(path, str(tmp_path / "out"))
    failed = grid.cells[1].directory(grid.output)
    failed.mkdir(parents=True)
    (failed / "failure.json").write_text("{}")
    positions = ["[1/3]", "[2/3]", "[3/3]"]
    packs = [[cell.cell_id for _, cell in pack] for pack in pack_cells(grid, positions, 3)]
    assert sorted(packs) == sorted([[grid.cells[1].cell_id], [grid.cells[0].cell_id, grid.cells[2].cell_id]])


def test_cells_trained_together_log_to_w_and_b_each_as_its_own_run(tiny_root, tmp_path, wandb_environment):
    """Two packed cells with offline W&B, the longer one failing in its last round: each
    cell's folder holds one W&B run with its name and its own per-round accuracy; the cell
    that finished first is marked finished with its final numbers, the failed one failed."""
    import json

    import yaml

    from fedbench.grid import load_grid
    from fedbench.together import run_configs

    path = packed_grid(tiny_root, tmp_path, {**AXES, "attack": ["badnets"]}, wandb={"mode": "offline"})
    cells = load_grid(path, str(tmp_path / "out")).cells
    paths = []
    for cell, rounds in zip(cells, (2, 3)):
        cell.config["federation"]["rounds"] = rounds
        paths.append(tmp_path / f"{cell.cell_id}.yaml")
        paths[-1].write_text(yaml.safe_dump(cell.config))
    close_round = FederatedRun.close_round

    def fails_in_round_2(run, opened, results):
        if opened.index == 2:
            raise RuntimeError("a fault in the longer cell's last round")
        return close_round(run, opened, results)

    FederatedRun.close_round = fails_in_round_2
    try:
        with pytest.raises(RuntimeError, match="a fault"):
            run_configs([str(p) for p in paths])
    finally:
        FederatedRun.close_round = close_round
    for cell, exit_code in zip(cells, (0, 1)):
        folder = tmp_path / "out" / "cells" / cell.cell_id
        (run_file,) = (folder / "wandb").glob("offline-run-*/run-*.wandb")
        records = wandb_records(run_file)
        (run,) = [r.run for r in records if r.HasField("run")]
        assert run.display_name == cell.cell_id and run.run_group == "tiny"
        logged = {row["trainer/global_step"]: row["clean_acc"] for row in wandb_history(records) if "clean_acc" in row}
        expected = [json.loads(line)["clean_acc"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
        assert logged == dict(enumerate(expected)) and len(expected) == 2, cell.cell_id
        assert wandb_exit_codes(records) == [exit_code]
        summary = wandb_summary(records)
        if exit_code == 0:
            assert json.loads((folder / "summary.json").read_text())["local_training"] == "cohort", "packed"
            final = json.loads((folder / "summary.json").read_text())["final"]
            assert summary["final/A"] == pytest.approx(final["A"])
            assert summary["final/ASR"] == pytest.approx(final["ASR"])
        else:
            assert "final/A" not in summary and not (folder / "summary.json").exists()


def test_a_pack_of_one_cell_runs_as_the_cell_alone(tiny_root, tmp_path, monkeypatch):
    """A retried cell, or the last of a group, runs as ``fedbench run`` would run it, where
    train.cohort=auto trains sequentially what a cohort cannot (a model with Dropout)."""
    import fedbench.cell_packs as cell_packs
    from fedbench.grid import load_grid

    cells = load_grid(packed_grid(tiny_root, tmp_path, AXES), str(tmp_path / "out")).cells
    alone: list[str] = []
    monkeypatch.setattr(cell_packs, "run_cell_isolated",
                        lambda cell, cell_dir, jobs, running: alone.append(cell.cell_id))
    monkeypatch.setattr(cell_packs, "run_process", lambda *args: pytest.fail("a pack process for one cell"))
    (tmp_path / "one").mkdir()
    cell_packs.run_pack_isolated(cells[:1], [tmp_path / "one"], 1, None)
    assert alone == [cells[0].cell_id]
