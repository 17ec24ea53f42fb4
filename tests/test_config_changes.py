"""A resumed run, or a grid cell skipped as finished, never carries numbers made under
another config: the change is refused before any training, named with both values."""

import copy
import json
from pathlib import Path

import pytest
import yaml

from fedbench.cli import main
import torch

from fedbench.config_changes import ConfigChanged, DefaultValue, config_changes, shown_name
from fedbench.grid import load_grid, run_grid

TINY = ["--train.local_steps", "2", "--train.batch_size", "32", "--federation.num_clients", "4",
        "--federation.final_rounds", "1", "--output.progress", "false", "--data.download", "false",
        "--wandb.mode", "disabled", "--output.checkpoint_every", "1", "--output.resume", "true"]


def test_the_changed_fields_are_those_written_out_by_hand():
    earlier = {"seed": 0, "logger": ["wandb"], "only_then": 1,
               "data": {"name": "mnist", "root": "/a", "download": True, "crop_padding": 4},
               "train": {"lr": 0.01, "batch_size": 64, "compile": None},
               "defense": {"class_path": "defenses.krum.Krum", "init_args": {"f": 3, "pair": (1, 2)}},
               "output": {"dir": "runs", "resume": True}, "wandb": {"mode": "offline", "tags": ["a"]}}
    now = {"seed": 0, "logger": ["csv"], "only_now": 2,
           "data": {"name": "mnist", "root": "/b", "download": False, "crop_padding": 4},
           "train": {"lr": 0.02, "batch_size": 64, "compile": "default"},
           "defense": {"class_path": "defenses.krum.Krum", "init_args": {"f": 2, "pair": [1, 2]}},
           "output": {"dir": "elsewhere", "resume": False}, "wandb": {"mode": "disabled", "tags": []}}
    # by hand: three fields changed, in the order the config now has them; where results go,
    # how they are logged, where the data is read from, a tuple read back as a list, a field
    # removed since and one fedbench does not know are not changes
    assert config_changes(earlier, now) == [("train.lr", 0.01, 0.02), ("train.compile", None, "default"),
                                            ("defense.init_args.f", 3, 2)]
    assert config_changes(earlier, now, ("train.lr",)) == [("train.compile", None, "default"),
                                                           ("defense.init_args.f", 3, 2)]
    assert config_changes(None, now) == [] and config_changes(earlier, None) == []
    # inf is not None (a summary writes it as "inf"); a value against a mapping is a change
    assert config_changes({"x": float("inf")}, {"x": None}) == [("x", "inf", None)]
    assert config_changes({"x": float("inf")}, {"x": float("inf")}) == []
    assert config_changes({"opts": None}, {"opts": {"k": 1}}) == [("opts", None, {"k": 1})]


def test_a_field_newer_than_the_earlier_run_is_compared_with_its_default():
    from fedbench.config import dump_config, parse_config_dict

    now = dump_config(parse_config_dict({"defense": "krum"}))
    earlier = copy.deepcopy(now)
    del earlier["train"]["cohort_convolution"], earlier["defense"]["init_args"]["f"]
    assert config_changes(earlier, now) == [], "both at their defaults (grouped; f None), as the earlier run ran"
    now["train"]["cohort_convolution"], now["defense"]["init_args"]["f"] = "matmul", 2
    changes = config_changes(earlier, now)
    assert changes == [("train.cohort_convolution", DefaultValue("grouped"), "matmul"),
                       ("defense.init_args.f", DefaultValue(None), 2)]
    assert shown_name("defense.init_args.f") == "defense.f" and shown_name("train.lr") == "train.lr"


def run_cli(capsys, root: Path, out: Path, *extra: str) -> tuple[int, str]:
    code = main(["run", "--data.root", str(root), *TINY, "--output.dir", str(out), "--output.name", "r", *extra])
    return code, capsys.readouterr().err


def test_a_run_resumed_with_another_config_is_refused_before_training(tiny_root, tmp_path, capsys):
    out = tmp_path / "runs"
    code, err = run_cli(capsys, tiny_root, out, "--federation.rounds", "2")
    assert code == 0, err
    folder = out / "r"
    files = {name: (folder / name).read_bytes() for name in ("metrics.jsonl", "config.yaml", "summary.json")}

    code, err = run_cli(capsys, tiny_root, out, "--federation.rounds", "3", "--train.lr", "0.02",
                        "--defense", "median")
    assert code == 2 and "Traceback" not in err
    assert "train.lr: 0.01 then, 0.02 now" in err
    assert "defense.class_path: 'defenses.fedavg.FedAvg' then, 'defenses.median.Median' now" in err
    assert "federation.rounds" not in err, "a resumed run may go on for more rounds"
    assert {name: (folder / name).read_bytes() for name in files} == files, "nothing trained or rewritten"

    code, err = run_cli(capsys, tiny_root, out, "--federation.rounds", "1")
    assert code == 2 and "federation.rounds: at least 2 (the rounds the checkpoint holds), 1 now" in err

    # where results go and how they are shown are not changes: the run goes on to round 3
    code, err = run_cli(capsys, tiny_root, out, "--federation.rounds", "3", "--wandb.mode", "offline",
                        "--data.root", str(tiny_root / ".." / tiny_root.name))
    assert code == 0, err
    rounds = [json.loads(line)["round"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [0, 1, 2], "resumed after round 1, not started over"


def test_the_engine_refuses_a_checkpoint_of_another_config_however_it_is_started(tiny_root, tmp_path, capsys):
    from fedbench.config import build_experiment, build_parser, parse_config_dict
    from fedbench.engine import FederatedRun

    out = tmp_path / "runs"
    assert run_cli(capsys, tiny_root, out, "--federation.rounds", "1")[0] == 0
    parser = build_parser()
    config = yaml.safe_load((out / "r" / "config.yaml").read_text())
    config["partition"]["beta"] = 0.3
    with pytest.raises(ConfigChanged, match=r"partition.beta: 0.5 then, 0.3 now"):
        FederatedRun(build_experiment(parse_config_dict(config, parser), parser))
    # the same config, but the checkpoint says it was written on a GPU
    checkpoint = out / "r" / "checkpoints" / "last.pt"
    state = torch.load(checkpoint, weights_only=True)
    assert state["device_type"] == "cpu"
    torch.save({**state, "device_type": "cuda"}, checkpoint)
    config["partition"]["beta"] = 0.5
    with pytest.raises(ConfigChanged, match=r"the device: cuda then, cpu now"):
        FederatedRun(build_experiment(parse_config_dict(config, parser), parser))


def write_grid(tmp_path: Path, root: Path) -> Path:
    grid = {"name": "tiny", "isolate": False, "checkpoint_every": 1,
            "base": {"data": {"root": str(root), "download": False},
                     "train": {"local_steps": 2, "batch_size": 32},
                     "federation": {"num_clients": 4, "rounds": 2, "final_rounds": 1},
                     "wandb": {"mode": "disabled"}},
            "axes": {"defense": ["fedavg", "median"]}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def test_a_grid_refuses_cells_that_ran_with_another_config_before_any_cell_runs(tiny_root, tmp_path):
    path, out = write_grid(tmp_path, tiny_root), tmp_path / "out"
    lines: list[str] = []
    assert run_grid(load_grid(path, str(out)), echo=lines.append)["counts"]["finished"] == 2
    summaries = {p.parent.name: p.read_bytes() for p in out.glob("cells/*/summary.json")}
    assert sorted(summaries) == ["fedavg", "median"]

    with pytest.raises(ConfigChanged) as refused:
        run_grid(load_grid(path, str(out), ["train.lr=0.05"]), echo=lines.append)
    message = str(refused.value)
    assert "  train.lr: 0.01 then, 0.05 now, in 2 finished cells (fedavg, median)\n" in message
    assert (out / "changed_cells.txt").read_text() == "fedavg\nmedian\n"

    # an unfinished cell (its summary gone, its checkpoint of round 1 kept) is compared with
    # its checkpoint, as a resumed run: more rounds are allowed for it, not for the finished
    # one, and fewer than its checkpoint holds for neither
    (out / "cells" / "median" / "summary.json").unlink()
    with pytest.raises(ConfigChanged) as refused:
        run_grid(load_grid(path, str(out), ["federation.rounds=3"]), echo=lines.append)
    message = str(refused.value)
    assert "  federation.rounds: 2 then, 3 now, in 1 finished cell (fedavg)\n" in message
    assert "unfinished cell" not in message
    with pytest.raises(ConfigChanged) as refused:
        run_grid(load_grid(path, str(out), ["federation.rounds=1"]), echo=lines.append)
    message = str(refused.value)
    assert "  federation.rounds: 2 then, 1 now, in 1 finished cell (fedavg)\n" in message
    assert "  federation.rounds: at least 2 (the rounds its checkpoint holds), 1 now, in 1 unfinished cell " \
           "(median)\n" in message
    assert {p.parent.name: p.read_bytes() for p in out.glob("cells/*/summary.json")} == \
        {"fedavg": summaries["fedavg"]}, "no cell ran"

    assert main(["grid", str(path), "--out", str(out), "--dry-run", "--set", "federation.num_clients=5"]) == 2

    # the same grid again: the finished cell is skipped, the other resumes from its checkpoint
    lines.clear()
    assert run_grid(load_grid(path, str(out)), echo=lines.append)["counts"]["finished"] == 2
    assert any("fedavg: finished earlier, skipped" in line for line in lines)
    assert (out / "cells" / "fedavg" / "summary.json").read_bytes() == summaries["fedavg"]
    metrics = (out / "cells" / "median" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in metrics] == [0, 1], "resumed, not run twice"

    # a checkpoint that cannot be read is left to its cell's own run: the others are compared
    (out / "cells" / "median" / "summary.json").unlink()
    checkpoint = out / "cells" / "median" / "checkpoints" / "last.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])
    with pytest.raises(ConfigChanged) as refused:
        run_grid(load_grid(path, str(out), ["train.lr=0.05"]), echo=lines.append)
    assert "in 1 finished cell (fedavg)" in str(refused.value) and "median" not in str(refused.value)
