import json
from statistics import fmean

import numpy as np
import pytest
import torch

from conftest import endless_training_batches, flat_params, load_flat, real_data_root, sgd_by_hand, tiny_experiment
from fedbench.client import LocalTrainConfig
from fedbench.data import DataConfig
from fedbench.engine import FederatedRun, run_experiment
from fedbench.experiment import FederationConfig
from fedbench.metrics import final_numbers
from fedbench.models import build_model
from fedbench.results import read_jsonl
from fedbench.seeding import derive_seed, torch_generator

NUMBERS = ("clean_acc", "clean_loss", "asr", "train_loss", "update_norms", "weights", "local_steps")


def test_short_run_writes_per_round_metrics_and_a_summary(tiny_root, tmp_path):
    exp = tiny_experiment(tiny_root, tmp_path, federation=FederationConfig(num_clients=5, rounds=3, final_rounds=2))
    summary = run_experiment(exp)
    records = read_jsonl(exp.run_dir / "metrics.jsonl")
    assert [r["round"] for r in records] == [0, 1, 2]
    for earlier, record in zip(records, records[1:]):
        # each round ran between the previous round's end and its own (wall clock)
        assert record["ended_at"] - earlier["ended_at"] >= record["time"]["round"] > 0
    for record in records:
        assert 0 <= record["clean_acc"] <= 100 and record["clean_loss"] > 0
        assert set(record["time"]) == {"local_training", "client_hook", "server_attack", "aggregation", "evaluation",
                                       "round"}
        assert record["clients"] == [0, 1, 2, 3, 4] and record["local_steps"] == [4] * 5
        assert abs(sum(record["weights"]) - 1) < 1e-6 and record["peak_memory_mb"] > 0
    on_disk = json.loads((exp.run_dir / "summary.json").read_text())
    assert on_disk["final"]["A"] == pytest.approx(fmean(r["clean_acc"] for r in records[-2:]))
    assert on_disk["final"] == summary["final"] and summary["final"]["ASR"] is None
    partition = json.loads((exp.run_dir / "partition.json").read_text())
    assert sum(map(sum, partition["class_counts"])) == 1080
    assert set(summary["versions"]) >= {"torch", "torchvision", "lightning", "fedbench"}


def test_fedavg_global_model_is_the_sample_weighted_mean_of_client_models(tiny_root, tmp_path):
    # Every client model is trained again here by hand (SGD written out in conftest, on the
    # batches a generator seeded as the engine seeds client c in round 0 draws), then averaged
    # with n_k / sum(n) in numpy. Nothing of the engine's training or aggregation is reused.
    exp = tiny_experiment(tiny_root, tmp_path, federation=FederationConfig(num_clients=4, rounds=1, final_rounds=1))
    run = FederatedRun(exp)
    data, train = run.data, exp.train
    channels, size = data.pipeline.channels, int(data.client_pool.images.shape[-1])
    torch.manual_seed(derive_seed(exp.seed, "model_init"))
    start = flat_params(build_model(exp.model.name, data.num_classes, channels, size))
    assert torch.equal(run.global_params.cpu(), start), "the starting model is the seeded build_model"

    client_models, counts = [], []
    for cid in range(4):
        model = build_model(exp.model.name, data.num_classes, channels, size)
        load_flat(model, start)
        generator = torch_generator(exp.seed, "train", 0, cid)
        batches = endless_training_batches(run.client_sets[cid], data.pipeline, train, generator)
        sgd_by_hand(model, batches, train.local_steps, train.lr, train.momentum, train.weight_decay)
        client_models.append(flat_params(model).double().numpy())
        counts.append(len(run.client_sets[cid]))
    counts = np.array(counts, dtype=np.float64)
    assert counts.sum() == 1080 and len(set(counts)) > 1, "unequal clients, so weighting matters"
    expected = (counts / counts.sum()) @ np.stack(client_models)

    record = run.run_round(0)
    assert record["local_steps"] == [train.local_steps] * 4
    got = run.global_params.double().cpu().numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    # The tolerance is far below what a wrong rule would be off by:
    unweighted = np.stack(client_models).mean(axis=0)
    assert np.abs(expected - unweighted).max() > 1e-4, "weighted and plain mean differ by > 100x atol"
    assert np.abs(expected - start.double().numpy()).max() > 1e-3, "so do trained and starting model"


def test_64_true_trains_the_clients_in_float64_and_sends_float32_updates(tiny_root, tmp_path):
    """fabric.precision=64-true: each client's update equals SGD written out by hand on a
    float64 copy of the starting model (float64 batches), rounded to float32 for the server;
    the same by hand in float32 is off by far more, so the test tells the two apart."""
    from conftest import spy_on_clients
    from fedbench.experiment import FabricConfig

    exp = tiny_experiment(tiny_root, tmp_path, fabric=FabricConfig(precision="64-true"),
                          federation=FederationConfig(num_clients=3, rounds=1, final_rounds=1))
    run = FederatedRun(exp)
    assert next(run.model.parameters()).dtype == torch.float64 and run.global_params.dtype == torch.float32
    sent = spy_on_clients(run)
    data, train = run.data, exp.train
    channels, size = data.pipeline.channels, int(data.client_pool.images.shape[-1])
    start = run.global_params.clone()
    run.run_round(0)
    for cid in range(3):
        by_hand = {}
        for dtype in (torch.float64, torch.float32):
            model = build_model(exp.model.name, data.num_classes, channels, size).to(dtype)
            load_flat(model, start.to(dtype))
            batches = endless_training_batches(run.client_sets[cid], data.pipeline, train,
                                               torch_generator(exp.seed, "train", 0, cid))
            sgd_by_hand(model, ((x.to(dtype), y) for x, y in batches), train.local_steps, train.lr, train.momentum,
                        train.weight_decay)
            by_hand[dtype] = (flat_params(model).double() - start.double()).numpy()
        got = sent[cid].double().numpy()
        assert sent[cid].dtype == torch.float32
        scale = np.abs(by_hand[torch.float64]).max()
        gap_64, gap_32 = np.abs(got - by_hand[torch.float64]).max(), np.abs(got - by_hand[torch.float32]).max()
        assert gap_64 <= 1e-7 * scale, (cid, gap_64 / scale)  # float32 rounding of the update only
        assert gap_32 > 3e-7 * scale, (cid, gap_32 / scale)  # 7e-7 to 1.1e-6 measured: float32 training fails the bound


def test_under_bf16_true_a_client_that_did_not_move_sends_a_zero_update(tiny_root, tmp_path):
    """The bf16 client starts from the float32 global model rounded to bf16: that rounding
    (about 10% of an update's norm) is not part of what it sends."""
    from fedbench.experiment import FabricConfig

    run = FederatedRun(tiny_experiment(tiny_root, tmp_path, fabric=FabricConfig(precision="bf16-true")))
    assert next(run.model.parameters()).dtype == torch.bfloat16
    # a global model after aggregation: float32 values that bf16 cannot hold
    noise = torch.randn(run.global_params.shape, generator=torch.Generator().manual_seed(0))
    run.global_params = run.global_params + 1e-4 * noise
    run.layout.load(run.model, run.global_params)
    rounded = run.global_params.to(torch.bfloat16).float()
    assert (rounded != run.global_params).any(), "the rounding is there to leave out"
    update = run.trained_minus(run.model, run.global_params)
    assert update.dtype == torch.float32 and torch.count_nonzero(update) == 0


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
    records = [{"clean_acc": a, "asr": s, "asr_all": t} for a, s, t in [(10, 90, 91), (50, 80, 82), (70, 40, 46),
                                                                         (80, 20, 28)]]
    final = final_numbers(records, 2)
    # By hand: A = (70 + 80) / 2, ASR = (40 + 20) / 2, ASR_all = (46 + 28) / 2 = 37.
    assert final == {"A": 75, "ASR": 30, "R": 70, "V": 72.5, "ASR_all": 37, "R_all": 63, "V_all": 69}


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


def test_a_registered_final_metric_reaches_the_final_numbers(monkeypatch):
    from fedbench.metrics import FINAL_METRICS, headline

    monkeypatch.setitem(FINAL_METRICS._entries, "worst_asr", lambda records: max(r["asr"] for r in records))
    records = [{"clean_acc": 50.0, "asr": a, "asr_all": a} for a in (10.0, 70.0, 40.0)]
    final = final_numbers(records, 2)
    assert final["worst_asr"] == 70.0 and headline()[-1] == "worst_asr"
    assert final["A"] == 50.0 and final["V"] == (50.0 + 100.0 - 55.0) / 2
