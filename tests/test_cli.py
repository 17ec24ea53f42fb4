"""The command line, driven for real: printing, errors, a user's own defense, W&B offline files."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from attacks import ATTACKS
from conftest import wandb_exit_codes, wandb_records, wandb_summary
from defenses import DEFENSES
from fedbench.cli import main

TINY = ["--train.local_steps", "2", "--train.batch_size", "32", "--federation.num_clients", "4",
        "--federation.rounds", "1", "--federation.final_rounds", "1", "--output.progress", "false",
        "--data.download", "false"]


def cli(*args, env=None, cwd=None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
    return subprocess.run([sys.executable, "-m", "fedbench.cli", *args], capture_output=True, text=True,
                          env=environment, cwd=cwd, timeout=300)


def printed_config(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exited:
        main(["run", *argv, "--print_config"])
    assert exited.value.code == 0
    return capsys.readouterr().out


def test_print_config_is_complete_and_round_trips(tmp_path, capsys):
    first = printed_config(["--attack", "dba", "--attack.poison_ratio", "0.4", "--defense", "krum",
                            "--defense.f", "2", "--partition.beta", "0.3"], capsys)
    config = yaml.safe_load(first)
    assert config["attack"]["class_path"] == "attacks.dba.DBA"
    assert config["attack"]["init_args"]["poison_ratio"] == 0.4
    assert config["defense"] == {"class_path": "defenses.krum.Krum", "init_args": {"f": 2}}
    assert config["data"]["root"] is None and "image_size" in config["data"], "nulls are printed too"
    path = tmp_path / "printed.yaml"
    path.write_text(first)
    assert printed_config(["--config", str(path)], capsys) == first


def test_init_args_spelled_out_on_the_command_line_are_options_too(capsys):
    config = yaml.safe_load(printed_config(["--attack", "badnets", "--attack.init_args.poison_ratio", "0.3"], capsys))
    assert config["attack"]["init_args"]["poison_ratio"] == 0.3


def test_registry_names_work_in_yaml_configs(tmp_path, capsys):
    path = tmp_path / "named.yaml"
    path.write_text("attack:\n  class_path: badnets\n  init_args: {size: 4}\ndefense: trimmed_mean\n")
    config = yaml.safe_load(printed_config(["--config", str(path)], capsys))
    assert config["attack"]["class_path"] == "attacks.badnets.BadNets"
    assert config["attack"]["init_args"]["size"] == 4
    assert config["defense"]["class_path"] == "defenses.trimmed_mean.TrimmedMean"
    inline = yaml.safe_load(printed_config(["--defense", '{"class_path": "krum", "init_args": {"f": 2}}'], capsys))
    assert inline["defense"] == {"class_path": "defenses.krum.Krum", "init_args": {"f": 2}}


def test_an_unknown_name_in_a_yaml_config_is_named_with_the_allowed_ones(tmp_path, capsys):
    path = tmp_path / "typo.yaml"
    path.write_text("defense:\n  class_path: krumm\n")
    assert main(["run", "--config", str(path)]) == 2
    assert f"defense='krumm': one of: {', '.join(DEFENSES.names())};" in capsys.readouterr().err


def test_help_lists_the_registered_attacks_and_defenses(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    for name in ("pixel_pattern", "blended", "dba", "badnets", "krum", "multi_krum", "fltrust", "sdfc", "median"):
        assert name in out


@pytest.mark.parametrize("argv,expected", [
    (["--federation.roundz", "3"], "roundz"),
    (["--defense", "no_such_defense"], f"defense='no_such_defense': one of: {', '.join(DEFENSES.names())};"),
    (["--defense", '{"class_path": "krumm", "init_args": {"f": 2}}'], f"defense='krumm': one of: {DEFENSES.names()[0]}"),
    (["--attack=badnet"], f"attack='badnet': one of: {', '.join(ATTACKS.names())};"),
    (["--partition.scheme", "zipf"], "partition.scheme"),
    (["--train.lr", "-0.1"], "train.lr=-0.1: a learning rate > 0"),
    (["--attack", "pixel_pattern", "--attack.poison_ratio", "1.5"], "attack.poison_ratio=1.5: a fraction in (0, 1]"),
    (["--defense", "krum", "--defense.f", "4", "--federation.num_clients", "10"], "n > 2f + 2"),
    (["--attack.malicious_fraction", "0.2"], "attack.malicious_fraction='0.2': an option of attack 'none', which "
                                             "takes: no options"),
    (["--defense.beta=0.1", "--defense", "krum"], "defense.beta='0.1': an option of defense 'krum', which takes: f"),
    (["--data.name", "svhn"], "data.name='svhn': one of: cifar10, cifar100, fashion_mnist, mnist"),
    (["--attack", "alie", "--attack.knowledge", "wrong"], "attack.knowledge='wrong': one of: omniscient, own"),
    (["--attack", "pixel_pattern", "--attack.selection", "wrong"], "attack.selection='wrong': one of: last, random"),
    (["--defense", "sdfc", "--defense.estimator", "wrong"], "defense.estimator='wrong': one of: empirical, published"),
])
def test_bad_input_is_one_clear_message_and_no_traceback(tiny_root, argv, expected, capsys):
    # in this process, as the console script calls it (one case through the script itself below)
    assert main(["run", "--data.root", str(tiny_root), *TINY[:-2], *argv]) == 2
    stderr = capsys.readouterr().err
    assert expected in stderr
    assert "Traceback" not in stderr and stderr.startswith("fedbench run: error:")
    assert "NestedArg" not in stderr, "not jsonargparse's dump of union types"


def test_the_console_script_reports_bad_input_in_one_line_without_traceback(tiny_root):
    result = cli("run", "--data.root", str(tiny_root), *TINY[:-2], "--train.lr", "-0.1")
    assert result.returncode == 2
    assert result.stderr.startswith("fedbench run: error:") and "train.lr=-0.1: a learning rate > 0" in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1


def test_a_users_own_defense_by_class_path_without_editing_the_suite(tiny_root, tmp_path):
    (tmp_path / "my_rules.py").write_text(
        "import torch\n"
        "from defenses.base import Aggregate, Defense\n\n"
        "class FirstClientOnly(Defense):\n"
        "    '''Takes client 0's update (a toy rule for this test).'''\n"
        "    def __init__(self, scale: float = 1.0):\n"
        "        super().__init__()\n"
        "        self.scale = scale\n"
        "    def aggregate(self, updates, num_samples, ctx):\n"
        "        weights = torch.zeros(len(updates)); weights[0] = 1.0\n"
        "        return Aggregate(self.scale * updates[0], weights, weights == 0)\n"
    )
    result = cli("run", "--data.root", str(tiny_root), *TINY, "--defense", "my_rules.FirstClientOnly",
                 "--defense.scale", "0.5", "--output.dir", str(tmp_path / "runs"), "--wandb.mode", "disabled",
                 env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    summary = json.loads(next((tmp_path / "runs").glob("*/summary.json")).read_text())
    assert summary["defense"] == "FirstClientOnly"
    assert summary["config"]["defense"] == {"class_path": "my_rules.FirstClientOnly", "init_args": {"scale": 0.5}}
    record = json.loads((next((tmp_path / "runs").glob("*/metrics.jsonl"))).read_text().splitlines()[0])
    assert record["weights"] == [1.0, 0.0, 0.0, 0.0]


def test_wandb_offline_files_live_under_the_run_folder(tiny_root, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    result = cli("run", "--data.root", str(tiny_root), *TINY, "--attack", "badnets",
                 "--attack.malicious_fraction", "0.25", "--output.dir", str(tmp_path / "runs"),
                 "--output.name", "cell", "--wandb.mode", "offline", "--wandb.group", "g1",
                 env={"HOME": str(home), "WANDB_MODE": None})
    assert result.returncode == 0, result.stderr
    wandb_dir = tmp_path / "runs" / "cell" / "wandb"
    runs = list(wandb_dir.glob("offline-run-*"))
    assert len(runs) == 1
    (run_file,) = runs[0].glob("*.wandb")  # the offline run file that `wandb sync` uploads
    assert not (home / ".cache" / "wandb").exists() and not (home / ".config" / "wandb").exists()
    final = json.loads((tmp_path / "runs" / "cell" / "summary.json").read_text())["final"]
    records = wandb_records(run_file)
    assert wandb_exit_codes(records) == [0], "finished, not failed"
    assert wandb_summary(records)["final/A"] == pytest.approx(final["A"])


def test_tensorboard_and_csv_loggers_get_the_per_round_metrics(tiny_root, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    argv = ["run", "--data.root", str(tiny_root), *TINY, "--federation.rounds", "2", "--logger", "[tensorboard, csv]",
            "--output.dir", str(tmp_path), "--output.name", "logged"]
    assert main(argv) == 0
    run = tmp_path / "logged"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert not (run / "wandb").exists(), "W&B only when asked for"
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    for key in ("clean_acc", "clean_loss", "train_loss", "time/round"):
        logged = {e.step: e.value for e in events.Scalars(key)}
        expected = {r["round"]: (r[key] if "/" not in key else r["time"][key.split("/")[1]]) for r in records}
        assert set(logged) == set(expected) and all(abs(logged[s] - expected[s]) <= 1e-5 * max(1, abs(expected[s]))
                                                    for s in logged), key
    final = {e.step: e.value for e in events.Scalars("final/A")}
    summary = json.loads((run / "summary.json").read_text())
    assert abs(final[2] - summary["final"]["A"]) < 1e-4
    import csv

    rows = [row for row in csv.DictReader((run / "csv" / "metrics.csv").open()) if row.get("clean_acc")]
    assert [int(r["step"]) for r in rows] == [r["round"] for r in records]
    assert [float(r["clean_acc"]) for r in rows] == [r["clean_acc"] for r in records]


def test_an_unknown_logger_is_one_clear_message(tiny_root):
    result = cli("run", "--data.root", str(tiny_root), *TINY[:-2], "--logger", "[mlflow]")
    assert result.returncode == 2 and "logger" in result.stderr and "Traceback" not in result.stderr
