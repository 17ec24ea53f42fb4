"""Defenses inside the round loop, each checked against a computation done here: the
aggregation rule in numpy on the updates the clients really sent, and clean accuracy and
ASR by evaluating the final global model in an explicit loop."""

import shutil

import numpy as np
import pytest
import torch

from attacks.badnets import BadNets
from attacks.pixel_pattern import PixelPattern
from conftest import endless_training_batches, flat_params, load_flat, sgd_by_hand, spy_on_clients, tiny_experiment
from defenses import DEFENSES
from defenses.fltrust import FLTrust
from defenses.multi_krum import MultiKrum
from fedbench.client import LocalTrainConfig
from fedbench.engine import FederatedRun
from fedbench.experiment import FederationConfig
from fedbench.models import build_model
from fedbench.seeding import torch_generator

BASELINES = ["fedavg", "norm_clipping", "krum", "multi_krum", "trimmed_mean", "median", "fltrust"]
# trimmed_mean: one value trimmed per side (f = 1, the one attacker among 5 clients).
ARGUMENTS = {"trimmed_mean": {"f": 1}}
ATOL = 1e-6


def fltrust_reference(updates: np.ndarray, g0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cao et al., NDSS 2021: TS_k = ReLU(cos(g_k, g0)); aggregate =
    sum_k TS_k * g_k * ||g0|| / ||g_k|| / sum_k TS_k (no move when every TS_k is 0)."""
    norm0 = np.linalg.norm(g0)
    trust = np.array([max(float(g @ g0) / (np.linalg.norm(g) * norm0), 0.0) for g in updates])
    if trust.sum() == 0:
        return np.zeros_like(g0), trust
    total = sum(t * g * norm0 / np.linalg.norm(g) for t, g in zip(trust, updates))
    return total / trust.sum(), trust


def reference_aggregate(name: str, updates: np.ndarray, counts: np.ndarray, f: int, g0=None):
    """(aggregate, verdict weights) of each baseline, from its paper's definition, in float64."""
    n = len(updates)
    fedavg_weights = counts / counts.sum()
    if name == "fedavg":
        return fedavg_weights @ updates, fedavg_weights
    if name == "norm_clipping":  # M = median of all norms; g * min(1, M / ||g||); sample-weighted
        norms = np.linalg.norm(updates, axis=1)
        bound = np.median(norms)
        clipped = np.stack([g * min(1.0, bound / norm) for g, norm in zip(updates, norms)])
        return fedavg_weights @ clipped, fedavg_weights
    if name in ("krum", "multi_krum"):  # score_i = sum of the n - f - 2 smallest ||g_i - g_j||^2, j != i
        scores = []
        for i in range(n):
            distances = sorted(float(((updates[i] - updates[j]) ** 2).sum()) for j in range(n) if j != i)
            scores.append(sum(distances[: n - f - 2]))
        order = sorted(range(n), key=lambda i: (scores[i], i))
        chosen = order[:1] if name == "krum" else order[: n - f]
        weights = np.zeros(n)
        weights[chosen] = 1.0 / len(chosen)
        return updates[chosen].mean(axis=0), weights
    if name in ("trimmed_mean", "median"):
        k = 1 if name == "trimmed_mean" else (n - 1) // 2
        ordered = np.sort(updates, axis=0)
        aggregate = np.median(updates, axis=0) if name == "median" else ordered[k : n - k].mean(axis=0)
        inside = ((updates >= ordered[k]) & (updates <= ordered[n - k - 1])).sum(axis=1).astype(np.float64)
        return aggregate, inside / inside.sum()
    if name == "fltrust":
        aggregate, trust = fltrust_reference(updates, g0)
        return aggregate, trust / trust.sum()
    raise KeyError(name)


PIXELS = [(row, col) for row in (0, 2) for col in (0, 1, 2, 4, 5, 6)]


def evaluate_by_hand(run: FederatedRun, target: int) -> dict:
    """The global model's metrics in a plain loop: inputs are the test images / 255, grey
    repeated to 3 channels, normalised with Fashion-MNIST's (= MNIST's) 0.1307 / 0.3081;
    the trigger sets channel 0 of 12 top-left pixels (rows 0 and 2, columns 0-2 and 4-6)
    to 1.0 in that normalised space. ``asr`` counts only test images whose true label is
    not the target, ``asr_all`` every test image. Percent; ``loss`` the mean cross-entropy."""
    data = run.data
    model = build_model("simple_cnn", data.num_classes, 3, int(data.test.images.shape[-1]))
    load_flat(model, run.global_params.cpu())
    model.eval()
    correct = hits = counted = hits_all = flips = 0
    loss = 0.0
    classes = set()
    with torch.no_grad():
        for start in range(0, len(data.test), 64):
            images = data.test.images[start : start + 64].cpu()
            labels = data.test.labels[start : start + 64].cpu()
            x = ((images.float() / 255.0 - 0.1307) / 0.3081).expand(-1, 3, -1, -1).clone()
            logits = model(x).double()
            clean = logits.argmax(dim=1)
            for row, col in PIXELS:
                x[:, 0, row, col] = 1.0
            triggered = model(x).argmax(dim=1)
            for i, label in enumerate(labels.tolist()):
                loss -= float(logits[i].log_softmax(dim=0)[label])
                correct += int(clean[i]) == label
                classes.add(int(clean[i]))
                flips += int(clean[i]) != int(triggered[i])
                hits_all += int(triggered[i]) == target
                if label != target:
                    counted += 1
                    hits += int(triggered[i]) == target
    n = len(data.test)
    return {"clean_acc": 100.0 * correct / n, "clean_loss": loss / n, "asr": 100.0 * hits / counted,
            "asr_all": 100.0 * hits_all / n, "classes": len(classes), "flips": flips}


def assert_metrics_match(record: dict, mine: dict) -> None:
    assert record["clean_acc"] == pytest.approx(mine["clean_acc"], abs=1e-4)
    assert record["clean_loss"] == pytest.approx(mine["clean_loss"], rel=1e-5)
    assert record["asr"] == pytest.approx(mine["asr"], abs=1e-4)
    assert record["asr_all"] == pytest.approx(mine["asr_all"], abs=1e-4)


def partially_backdoored_model(num_classes: int, target: int, strength: float) -> torch.nn.Module:
    """A simple_cnn built by hand whose clean predictions vary and whose trigger moves only
    some of them to the target. Clean inputs are grey repeated to 3 channels, so channel 0
    minus channel 1 is 0 everywhere except on the trigger's pixels: conv1 filter 0 computes
    that difference and an isolated chain of units carries it to the target's logit with
    weight ``strength``. Every other weight is N(0, 0.1^2), seeded."""
    model = build_model("simple_cnn", num_classes, 3, 32)
    generator = torch.Generator().manual_seed(0)
    m = model
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
        m.conv1.weight[0] = 0
        m.conv1.weight[0, 0, 0, 0], m.conv1.weight[0, 1, 0, 0], m.conv1.bias[0] = 1.0, -1.0, 0.0
        m.conv2.weight[:, 0] = 0
        m.conv2.weight[0], m.conv2.bias[0] = 0.0, 0.0
        m.conv2.weight[0, 0] = 1.0
        for layer, inputs in ((m.fc1, slice(0, 25)), (m.fc2, slice(0, 1)), (m.l1, slice(0, 1)), (m.l2, slice(0, 1))):
            layer.weight[:, inputs] = 0
            layer.weight[0], layer.bias[0] = 0.0, 0.0
            layer.weight[0, inputs] = 1.0
        m.cls.weight[:, 0] = 0
        m.cls.weight[target, 0] = strength
    return model


def spy_on_server_training(defense) -> list[torch.Tensor]:
    """Record FLTrust's server update g0 (what the engine's server_train returns)."""
    made: list[torch.Tensor] = []
    server_train = defense.env.server_train

    def recording(*args):
        update = server_train(*args)
        made.append(update.detach().clone())
        return update

    defense.env.server_train = recording
    return made


@pytest.mark.parametrize("name", BASELINES)
def test_every_defense_aggregates_and_evaluates_as_an_independent_computation(tiny_root, tmp_path, name):
    attack = PixelPattern(malicious_fraction=0.2)  # client 4 attacks
    exp = tiny_experiment(tiny_root, tmp_path, attack=attack, defense=DEFENSES.get(name)(**ARGUMENTS.get(name, {})),
                          federation=FederationConfig(num_clients=5, rounds=2, final_rounds=1))
    run = FederatedRun(exp)
    sent = spy_on_clients(run)
    server_updates = spy_on_server_training(exp.defense) if name == "fltrust" else []
    counts = np.array([len(s) for s in run.client_sets], dtype=np.float64)
    f = attack.num_malicious(5)
    assert f == 1
    records = []
    for round_index in range(2):
        start = run.global_params.double().cpu().numpy()
        sent.clear()
        record = run.run_round(round_index)
        run.records.append(record)
        records.append(record)
        assert record["clients"] == [0, 1, 2, 3, 4] and record["attacking"] == [False] * 4 + [True]
        updates = np.stack([sent[c].double().cpu().numpy() for c in record["clients"]])
        g0 = server_updates[-1].double().cpu().numpy() if server_updates else None
        expected, weights = reference_aggregate(name, updates, counts[record["clients"]], f, g0)
        moved = run.global_params.double().cpu().numpy() - start
        np.testing.assert_allclose(moved, expected, rtol=0, atol=ATOL, err_msg=f"{name}, round {round_index}")
        np.testing.assert_allclose(record["weights"], weights, rtol=0, atol=1e-6)
        if name != "fedavg":
            fedavg = reference_aggregate("fedavg", updates, counts, f)[0]
            assert np.abs(expected - fedavg).max() > 100 * ATOL, "the rule differs measurably from FedAvg"

    mine = evaluate_by_hand(run, attack.target_label)
    assert_metrics_match(records[-1], mine)
    summary = run.summary(0.0)
    final = summary["final"]  # final_rounds = 1: the last round's numbers
    assert final["A"] == pytest.approx(mine["clean_acc"], abs=1e-4)
    assert final["ASR"] == pytest.approx(mine["asr"], abs=1e-4)
    assert summary["detection"]["rounds"] == 2


def test_round_metrics_equal_an_independent_evaluation_of_a_partially_backdoored_model(tiny_root, tmp_path):
    # Two rounds of tiny training leave a model that predicts one class, on which accuracy
    # and ASR checks are weak; here the global model is one built by hand whose predictions
    # vary and whose trigger works on about half of the images. Every update is rejected by
    # screening (max_update_norm 1e-12), so the round evaluates exactly that model.
    attack = PixelPattern(malicious_fraction=0.2)
    exp = tiny_experiment(tiny_root, tmp_path, attack=attack,
                          federation=FederationConfig(num_clients=5, rounds=1, final_rounds=1, max_update_norm=1e-12))
    run = FederatedRun(exp)
    crafted = flat_params(partially_backdoored_model(run.data.num_classes, attack.target_label, 0.03))
    run.global_params = crafted.to(run.global_params.device)
    record = run.run_round(0)
    assert record["rejected"] == {str(c): "norm_above_limit" for c in range(5)}
    assert torch.equal(run.global_params.cpu(), crafted)
    mine = evaluate_by_hand(run, attack.target_label)
    assert mine["classes"] >= 3 and mine["flips"] >= 30, "varied predictions that the trigger changes"
    assert 20 < mine["asr"] < 90 and abs(mine["asr"] - mine["asr_all"]) > 1, "the non-target count matters"
    assert_metrics_match(record, mine)


def server_update_by_hand(run, start: torch.Tensor, steps: int, round_index: int = 0) -> np.ndarray:
    """FLTrust's g0 redone by hand: the global model ``start`` trained on the root set by
    explicit SGD with the clients' optimizer for ``steps`` steps, on the server's stream."""
    exp, root = run.exp, run.exp.defense.root_set
    model = build_model("simple_cnn", run.data.num_classes, 3, int(root.images.shape[-1]))
    load_flat(model, start.cpu())
    batches = endless_training_batches(root, run.data.pipeline, exp.train,
                                       torch_generator(exp.seed, "server", round_index))
    train = exp.train
    sgd_by_hand(model, batches, steps, train.lr, train.momentum, train.weight_decay)
    return (flat_params(model) - start.cpu()).double().numpy()


def sequential_trainings(run) -> list[dict]:
    """Record the keyword arguments of every training of the run's sequential trainer."""
    calls: list[dict] = []
    train = run.trainer.train

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return train(*args, **kwargs)

    run.trainer.train = recording
    return calls


@pytest.mark.parametrize("cohort, batch_size, compile_mode", [(False, 32, None), (True, 32, None), (True, 8, None),
                                                              (True, 8, "default")],
                         ids=["sequential", "cohort batch by batch", "cohort feed", "compiled cohort"])
def test_fltrust_server_update_and_rule_against_an_independent_computation(tiny_root, tmp_path, cohort, batch_size,
                                                                            compile_mode):
    # In a cohort the server's training is one more row of the clients' cohort (batch 32: the
    # 20-sample root set is one short batch, so the cohort goes batch by batch; batch 8: every
    # set has whole batches, so the cohort feed serves the root set's rows too; compiled: one
    # fused step over the six rows).
    if compile_mode is not None and shutil.which("g++") is None and shutil.which("cc") is None:
        pytest.skip("NO C++ COMPILER: torch.compile on CPU needs one, so the compiled cohort is untested here")
    exp = tiny_experiment(tiny_root, tmp_path, attack=PixelPattern(malicious_fraction=0.2),
                          defense=FLTrust(root_size=20),
                          train=LocalTrainConfig(local_steps=4, batch_size=batch_size, cohort=cohort,
                                                 compile=compile_mode),
                          federation=FederationConfig(num_clients=5, rounds=1, final_rounds=1))
    run = FederatedRun(exp)
    root = exp.defense.root_set
    server_rows = {tuple(img.flatten().tolist()) for img in run.data.server.images}
    assert len(root) == 20 and all(tuple(img.flatten().tolist()) in server_rows for img in root.images)

    sent = spy_on_clients(run)
    server_updates = spy_on_server_training(exp.defense)
    trained_alone = sequential_trainings(run)
    outputs = []
    aggregate = exp.defense.aggregate
    exp.defense.aggregate = lambda *args: outputs.append(aggregate(*args)) or outputs[-1]
    start = run.global_params.clone()
    record = run.run_round(0)
    (g0,) = server_updates
    (out,) = outputs
    # sequentially: 5 clients and the server, one after another; in a cohort: all six together
    assert [call.get("max_steps") for call in trained_alone] == ([None] * 5 + [4] if not cohort else [])
    assert (run.cohort_trainer.pool is not None) == (cohort and batch_size == 8), "the feed served the cohort"
    assert (run.cohort_trainer.every_parameter_used is True) == (compile_mode is not None), "the fused step trained"

    # g0: the paper's server update, the global model trained on the root set with the clients'
    # optimizer for the clients' number of local iterations, here redone by hand.
    by_hand = server_update_by_hand(run, start, exp.train.local_steps)
    g0 = g0.double().cpu().numpy()
    assert np.linalg.norm(by_hand) > 1e-2
    np.testing.assert_allclose(g0, by_hand, rtol=0, atol=1e-6)

    # The rule, in numpy, on the updates the clients sent and that g0.
    updates = np.stack([sent[c].double().cpu().numpy() for c in record["clients"]])
    expected, trust = fltrust_reference(updates, g0)
    assert trust.max() > 0.1 and trust.max() - trust.min() > 0.1, "unequal trust: the weighting matters"
    np.testing.assert_allclose(out.update.double().cpu().numpy(), expected, rtol=0, atol=ATOL)
    np.testing.assert_allclose(out.weights.double().cpu().numpy(), trust / trust.sum(), rtol=0, atol=1e-6)
    assert out.excluded.tolist() == (trust == 0).tolist() == record["excluded"]
    np.testing.assert_allclose((run.global_params - start).double().cpu().numpy(), expected, rtol=0, atol=ATOL)
    plain = updates.mean(axis=0)
    assert np.abs(expected - plain).max() > 100 * ATOL, "the rule differs measurably from a plain mean"
    assert record["defense"]["server_norm"] == pytest.approx(np.linalg.norm(g0), rel=1e-6)

    # The same updates plus the most trusted one flipped (trust 0: excluded) and scaled up 30x
    # (rescaled to ||g0||, so it counts no more than the original).
    best = int(np.argmax(trust))
    more = np.vstack([updates, -updates[best], 30 * updates[best]])
    expected, more_trust = fltrust_reference(more, g0)
    out = FLTrust.combine(torch.from_numpy(more).float(), torch.from_numpy(g0).float())
    assert more_trust[5] == 0 and more_trust[6] == pytest.approx(trust[best])
    np.testing.assert_allclose(out.update.double().numpy(), expected, rtol=0, atol=ATOL)
    np.testing.assert_allclose(out.weights.double().numpy(), more_trust / more_trust.sum(), rtol=0, atol=1e-6)
    assert out.excluded.tolist() == (more_trust == 0).tolist()


@pytest.mark.parametrize("drop_last", [True, False])
def test_fltrust_server_row_trains_the_median_of_the_clients_epochs(tiny_root, tmp_path, drop_last):
    # By epochs, the clients' steps differ (2 epochs of their batches of 9: the last one short
    # without drop_last, which moves the median client's steps); the server row's steps,
    # foreseen before training, are the lower median of what they then take, and its g0 is
    # the root set trained that many steps (drop_last: the cohort feed serves every row;
    # without: batch by batch, the root set's last batch short).
    exp = tiny_experiment(tiny_root, tmp_path, defense=FLTrust(root_size=20),
                          train=LocalTrainConfig(local_epochs=2, batch_size=9, drop_last=drop_last, cohort=True),
                          federation=FederationConfig(num_clients=5, rounds=2, final_rounds=1))
    run = FederatedRun(exp)
    server_updates = spy_on_server_training(exp.defense)
    trained_alone = sequential_trainings(run)
    sizes = [len(s) for s in run.client_sets]
    by_epochs = [2 * (n // 9 if drop_last else -(-n // 9)) for n in sizes]
    median = sorted(by_epochs)[2]
    assert len(set(by_epochs)) > 2, "clients of different sizes"
    row_seconds = []
    server_trained = run.server_trained
    run.server_trained = lambda result, seconds: row_seconds.append(seconds) or server_trained(result, seconds)
    for round_index in range(2):
        start = run.global_params.clone()
        record = run.run_round(round_index)
        assert record["time"]["aggregation"] >= row_seconds[-1] > 0, "the row's time counts as aggregation's"
        assert record["local_steps"] == [by_epochs[c] for c in record["clients"]]
        assert record["defense"]["server_steps"] == median
        by_hand = server_update_by_hand(run, start, median, round_index)
        np.testing.assert_allclose(server_updates[-1].double().cpu().numpy(), by_hand, rtol=0, atol=1e-6)
    assert trained_alone == [], "the server trained in the cohort, not alone"


def test_fltrust_trains_when_asked_for_a_server_update_the_cohort_did_not_foresee(tiny_root, tmp_path):
    # The steps foreseen for the clients are made wrong (5, they take 4): the cohort's server
    # row trains 5 steps, the defense asks for 4, so the server trains then, from the global model.
    exp = tiny_experiment(tiny_root, tmp_path, defense=FLTrust(root_size=20),
                          train=LocalTrainConfig(local_steps=4, batch_size=8, cohort=True),
                          federation=FederationConfig(num_clients=5, rounds=1, final_rounds=1))
    run = FederatedRun(exp)
    run.expected_steps = lambda client_id: 5
    server_updates = spy_on_server_training(exp.defense)
    trained_alone = sequential_trainings(run)
    start = run.global_params.clone()
    run.run_round(0)
    assert [call.get("max_steps") for call in trained_alone] == [4]
    np.testing.assert_allclose(server_updates[0].double().cpu().numpy(), server_update_by_hand(run, start, 4),
                               rtol=0, atol=1e-6)


def test_a_server_row_left_from_a_refused_round_does_not_answer_the_next_rounds_call(tiny_root, tmp_path):
    # Round 0's updates are all refused (max_update_norm), so FLTrust never asks for its row
    # and the global model stays the same object; round 1 trains its clients sequentially (no
    # new row): its call must train g0 on round 1's stream, not take round 0's row.
    exp = tiny_experiment(tiny_root, tmp_path, defense=FLTrust(root_size=20),
                          train=LocalTrainConfig(local_steps=4, batch_size=8, cohort=True),
                          federation=FederationConfig(num_clients=5, rounds=2, final_rounds=1, max_update_norm=1e-12))
    run = FederatedRun(exp)
    server_updates = spy_on_server_training(exp.defense)
    trained_alone = sequential_trainings(run)
    record = run.run_round(0)
    assert len(record["rejected"]) == 5 and server_updates == [] and trained_alone == []
    run.exp.federation.max_update_norm = None
    run.cohort = False
    start = run.global_params.clone()
    run.run_round(1)
    assert [call.get("max_steps") for call in trained_alone] == [None] * 5 + [4]
    np.testing.assert_allclose(server_updates[0].double().cpu().numpy(), server_update_by_hand(run, start, 4, 1),
                               rtol=0, atol=1e-6)


def test_excluded_clients_show_up_in_the_detection_metrics(tiny_root, tmp_path):
    # One attacker (client 4) boosts its update 50x: Multi-Krum (f = 1, m = 4) must drop it.
    exp = tiny_experiment(tiny_root, tmp_path, attack=BadNets(malicious_fraction=0.2, scale=50.0),
                          defense=MultiKrum(), federation=FederationConfig(num_clients=5, rounds=1, final_rounds=1))
    record = FederatedRun(exp).run_round(0)
    assert record["attacking"] == [False, False, False, False, True]
    assert record["excluded"] == [False, False, False, False, True]
    assert record["detection"]["tpr"] == 1.0 and record["detection"]["fpr"] == 0.0
    assert record["detection"]["precision"] == 1.0 and record["detection"]["malicious_weight"] == 0.0
