import json
from statistics import fmean

import pytest
import torch

from conftest import real_data_root, tiny_experiment
from fedbench.client import LocalTrainConfig
from fedbench.data import DataConfig
from fedbench.engine import FederatedRun, FederationConfig, final_numbers, run_experiment
from fedbench.results import read_jsonl

NUMBERS = ("clean_acc", "clean_loss", "asr", "train_loss", "update_norms", "weights", "local_steps")


def test_short_run_writes_per_round_metrics_and_a_summary(tiny_root, tmp_path):
    exp = tiny_experiment(tiny_root, tmp_path, federation=FederationConfig(num_clients=5, rounds=3, final_rounds=2))
    summary = run_experiment(exp)
    records = read_jsonl(exp.run_dir / "metrics.jsonl")
    assert [r["round"] for r in records] == [0, 1, 2]
    for record in records:
        assert 0 <= record["clean_acc"] <= 100 and record["clean_loss"] > 0
        assert set(record["time"]) == {"local_training", "client_hook", "aggregation", "evaluation", "round"}
        assert record["clients"] == [0, 1, 2, 3, 4] and record["local_steps"] == [4] * 5
        assert abs(sum(record["weights"]) - 1) < 1e-6 and record["peak_memory_mb"] > 0
    on_disk = json.loads((exp.run_dir / "summary.json").read_text())
    assert on_disk["final"]["A"] == pytest.approx(fmean(r["clean_acc"] for r in records[-2:]))
    assert on_disk["final"] == summary["final"] and summary["final"]["ASR"] is None
    partition = json.loads((exp.run_dir / "partition.json").read_text())
    assert sum(map(sum, partition["class_counts"])) == 1080
    assert set(summary["versions"]) >= {"torch", "torchvision", "lightning", "fedbench"}


def test_fedavg_global_model_is_the_sample_weighted_mean_of_client_models(tiny_root, tmp_path):
    exp = tiny_experiment(tiny_root, tmp_path, federation=FederationConfig(num_clients=4, rounds=1, final_rounds=1))
    run = FederatedRun(exp)
    start = run.global_params.clone()
    client_models = []
    for cid in range(4):
        result = run.train_client(run.client_info(cid, 0))
        client_models.append(start + result["update"])
    run.global_params = start
    run.run_round(0)
    weights = run.num_samples.double() / run.num_samples.sum()
    expected = sum(w * m.double() for w, m in zip(weights, client_models))
    assert torch.allclose(run.global_params.double(), expected, atol=1e-6)


def test_same_config_and_seed_give_bit_identical_numbers(tiny_root, tmp_path):
    runs = []
    for name in ("a", "b", "c"):
        seed = 1 if name == "c" else 0
        exp = tiny_experiment(tiny_root, tmp_path / name, seed=seed)
        run = FederatedRun(exp)
        run.run()
        runs.append((read_jsonl(exp.run_dir / "metrics.jsonl"), run.global_params))
    (first, params_a), (second, params_b), (other, params_c) = runs
    for key in NUMBERS:
        assert [r[key] for r in first] == [r[key] for r in second], key
    assert torch.equal(params_a, params_b)
    assert not torch.equal(params_a, params_c)


def test_local_epochs_mode_counts_steps_with_drop_last(tiny_root, tmp_path):
    exp = tiny_experiment(tiny_root, tmp_path, train=LocalTrainConfig(local_epochs=2, batch_size=32),
                          federation=FederationConfig(num_clients=3, rounds=1, final_rounds=1))
    run = FederatedRun(exp)
    record = run.run_round(0)
    expected = [2 * max(len(s) // 32, 1) for s in run.client_sets]
    assert record["local_steps"] == expected


def test_round_metrics_are_final_numbers_of_the_last_rounds():
    records = [{"clean_acc": a, "asr": s} for a, s in [(10, 90), (50, 80), (70, 40), (80, 20)]]
    final = final_numbers(records, 2)
    assert final == {"A": 75, "ASR": 30, "R": 70, "V": 72.5}


@pytest.mark.skipif(real_data_root() is None, reason="no real Fashion-MNIST copy on this machine")
def test_real_fashion_mnist_fedavg_learns_within_a_few_rounds(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDBENCH_CACHE", str(tmp_path / "cache"))
    exp = tiny_experiment(
        real_data_root(), tmp_path,
        data=DataConfig(root=str(real_data_root()), download=False, test_subset=2000),
        train=LocalTrainConfig(local_steps=25),
        federation=FederationConfig(num_clients=10, rounds=5, final_rounds=1),
    )
    summary = run_experiment(exp)
    assert summary["final"]["A"] > 30, "10 classes: chance is 10%"
