"""SDFC piece by piece: the Fisher estimators, the weight rule, the calibration term, and the loop."""

import math

import numpy as np
import pytest
import torch

from attacks.pixel_pattern import PixelPattern
from attacks.base import ClientInfo
from conftest import endless_training_batches, flat_params, load_flat, sgd_by_hand, tiny_experiment
from defenses.base import RoundContext
from defenses.sdfc import SCORE, SDFC, difference_score, exp_neg_weights
from fedbench.engine import FederatedRun
from fedbench.experiment import FederationConfig
from fedbench.client import iterate_batches
from fedbench.data import DataConfig
from fedbench.fisher import diagonal_fisher
from fedbench.models import build_model
from fedbench.seeding import torch_generator


def two_class_linear() -> torch.nn.Module:
    model = torch.nn.Linear(1, 2)
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    return model


def fisher_by_per_sample_loop(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """The empirical Fisher the slow way: one backward pass per sample."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for i in range(len(y)):
        grads = torch.autograd.grad(torch.log_softmax(model(x[i:i + 1]), dim=1)[0, y[i]], params)
        for acc, g in zip(total, grads):
            acc += g**2 / len(y)
    return total


def fisher_by_batch_loop_as_published(model: torch.nn.Module, batches) -> list[torch.Tensor]:
    """The published estimator the slow way: per batch, the gradient of the mean of
    log p(y_j | x_i) over all B^2 pairs (i, j), written as sum_c (sum_i log p(c | x_i)) *
    #{j: y_j = c} / B^2; gradients averaged over batches, then squared."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    count = 0
    for x, y in batches:
        log_probs = torch.log_softmax(model(x), dim=1)
        label_counts = torch.bincount(y, minlength=log_probs.shape[1]).to(log_probs.dtype)
        objective = (log_probs.sum(dim=0) * label_counts).sum() / len(y) ** 2
        for acc, g in zip(total, torch.autograd.grad(objective, params)):
            acc += g
        count += 1
    return [(acc / count) ** 2 for acc in total]


def fisher_difference_by_hand(model, local_batches, server_batches, estimator) -> list[torch.Tensor]:
    """|F(w, D_local) - F(w, D_val)| per tensor, each Fisher by an explicit loop."""

    def fisher(batches):
        batches = list(batches)
        if estimator == "empirical":
            return fisher_by_per_sample_loop(model, torch.cat([x for x, _ in batches]),
                                             torch.cat([y for _, y in batches]))
        return fisher_by_batch_loop_as_published(model, batches)

    return [(a - b).abs() for a, b in zip(fisher(local_batches), fisher(server_batches))]


def test_empirical_fisher_by_hand():
    # w = 0, b = 0 -> p = (1/2, 1/2); d log p(y|x) / d w_c = (1[c = y] - 1/2) x, / d b_c = 1[c = y] - 1/2.
    # (x=2, y=0): dw = (1, -1), db = (1/2, -1/2); (x=-1, y=1): dw = (1/2, -1/2), db = (-1/2, 1/2).
    batches = [(torch.tensor([[2.0], [-1.0]]), torch.tensor([0, 1]))]
    fisher_w, fisher_b = diagonal_fisher(two_class_linear(), batches, "empirical")
    assert torch.allclose(fisher_w, torch.tensor([[0.625], [0.625]]))  # (1 + 1/4) / 2
    assert torch.allclose(fisher_b, torch.tensor([0.25, 0.25]))


def test_published_fisher_by_hand_including_its_pairwise_label_indexing():
    # The code averages log p(y_j | x_i) over ALL pairs (i, j): with labels (0, 1) the label
    # terms cancel, sum_j (1[c = y_j] - 1/2) = 0, so the gradient and the Fisher are 0.
    batches = [(torch.tensor([[2.0], [-1.0]]), torch.tensor([0, 1]))]
    fisher_w, fisher_b = diagonal_fisher(two_class_linear(), batches, "published")
    assert torch.equal(fisher_w, torch.zeros(2, 1)) and torch.equal(fisher_b, torch.zeros(2))
    # Labels (0, 0): dL/dw_c = (1/4) * sum_i sum_j (1[c = 0] - 1/2) x_i = (1/4) * (+-1) * (2 - 1) = +-1/4;
    # dL/db_c = (1/4) * 2 * 2 * (+-1/2) = +-1/2. Squared: 1/16 and 1/4.
    batches = [(torch.tensor([[2.0], [-1.0]]), torch.tensor([0, 0]))]
    fisher_w, fisher_b = diagonal_fisher(two_class_linear(), batches, "published")
    assert torch.allclose(fisher_w, torch.tensor([[1 / 16], [1 / 16]]))
    assert torch.allclose(fisher_b, torch.tensor([0.25, 0.25]))


def test_published_fisher_averages_gradients_over_batches_before_squaring():
    one = [(torch.tensor([[2.0], [-1.0]]), torch.tensor([0, 0]))]
    flipped = [(torch.tensor([[2.0], [-1.0]]), torch.tensor([1, 1]))]  # opposite gradient
    _, fisher_b = diagonal_fisher(two_class_linear(), one + flipped, "published")
    assert torch.equal(fisher_b, torch.zeros(2)), "mean of +g and -g is 0 before squaring"


def test_empirical_fisher_matches_an_explicit_per_sample_loop_on_a_cnn():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 5))
    x, y = torch.randn(12, 3, 8, 8), torch.randint(0, 5, (12,))
    batched = diagonal_fisher(model, [(x[:7], y[:7]), (x[7:], y[7:])], "empirical")
    loop = fisher_by_per_sample_loop(model, x, y)
    for a, b in zip(batched, loop):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_weight_rule_on_given_scores():
    weights = exp_neg_weights(torch.tensor([2.0, 4.0, 3.0], dtype=torch.float64))
    # min-max: (0, 1, 1/2) -> softmax(-(0, 1, 1/2)) = (1, e^-1, e^-1/2) / sum
    raw = torch.tensor([1.0, math.exp(-1), math.exp(-0.5)], dtype=torch.float64)
    assert torch.allclose(weights, raw / raw.sum())
    assert weights[0] > weights[2] > weights[1], "larger Delta, smaller weight"


def test_weight_rule_with_equal_scores_is_uniform_not_nan():
    weights = exp_neg_weights(torch.tensor([0.7, 0.7, 0.7, 0.7]))
    assert torch.equal(weights, torch.full((4,), 0.25))


def test_difference_score_is_the_mean_over_tensors_of_each_tensors_sum():
    delta = [torch.tensor([[1.0, 2.0]]), torch.tensor([3.0, 4.0, 5.0])]
    assert difference_score(delta).item() == pytest.approx((3.0 + 12.0) / 2)


def test_server_aggregates_client_models_with_the_score_weights():
    sdfc = SDFC()
    updates = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    scores = torch.tensor([1.0, 5.0])
    ctx = RoundContext(0, torch.arange(2), torch.zeros(2), torch.ones(2, dtype=torch.long), {SCORE: scores})
    out = sdfc.aggregate(updates, torch.tensor([10, 10]), ctx)
    w = torch.tensor([1.0, math.exp(-1)]) / (1 + math.exp(-1))
    assert torch.allclose(out.update, w) and torch.allclose(out.weights, w) and not out.excluded.any()
    ablation = SDFC(mode="calibration_only").aggregate(updates, torch.tensor([30, 10]), ctx)
    assert torch.allclose(ablation.weights, torch.tensor([0.75, 0.25])), "FedAvg weights"


def test_calibration_term_and_its_gradient():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    sdfc = SDFC(calibration_lambda=0.5)
    hook = sdfc.client_hook()
    delta = [torch.rand_like(p) for p in model.parameters()]
    previous = [p.detach().clone() for p in model.parameters()]
    hook.delta[0], hook.previous[0], hook.stored_round[0] = delta, previous, 0  # fresh for round 1
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    term = hook.before_training(ClientInfo(0, 1), model, None, None)
    value = term()
    expected = 0.5 * sum((d * (p - q) ** 2).sum() for p, q, d in zip(model.parameters(), previous, delta))
    assert torch.allclose(value, expected)
    value.backward()
    for p, q, d in zip(model.parameters(), previous, delta):
        assert torch.allclose(p.grad, 2 * 0.5 * d * (p.detach() - q)), "d/dtheta = 2 lambda Delta (theta - prev)"


def test_adaptive_attackers_and_weights_only_skip_the_calibration_term():
    hook = SDFC().client_hook()
    hook.delta[0], hook.previous[0], hook.stored_round[0] = [torch.ones(1)], [torch.zeros(1)], 0
    model = torch.nn.Linear(1, 1, bias=False)
    attacker = ClientInfo(0, 1, malicious=True, attacking=True, attacker_rank=0)
    assert hook.before_training(attacker, model, None, None) is not None, "an honest attacker is calibrated"
    evading = PixelPattern(adaptive=True).client_protocol(attacker, hook)
    assert evading.before_training(attacker, model, None, None) is None
    assert PixelPattern().client_protocol(attacker, hook) is hook, "not adaptive: the defense's own protocol"
    weights_only = SDFC(mode="weights_only").client_hook()
    weights_only.delta[0], weights_only.previous[0] = [torch.ones(1)], [torch.zeros(1)]
    assert weights_only.before_training(ClientInfo(0, 1), model, None, None) is None


def test_an_adaptive_attacker_reports_the_score_of_its_clean_samples_only():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    clean_batches = [(torch.randn(8, 1, 2, 2), torch.randint(0, 3, (8,)))]
    poisoned = [(clean_batches[0][0] + 5.0, torch.full((8,), 2))]
    server = [(torch.randn(8, 1, 2, 2), torch.randint(0, 3, (8,)))]
    asked = []

    def local_batches(clean: bool = False):
        asked.append(clean)
        return iter(clean_batches if clean else poisoned)

    client = ClientInfo(0, 0, malicious=True, attacking=True, attacker_rank=0)
    hook = SDFC().client_hook()
    reported = PixelPattern(adaptive=True).client_protocol(client, hook).after_training(
        client, model, local_batches, lambda: iter(server))[SCORE]
    assert asked and all(asked), "every batch it computed on was clean"
    expected = sum(d.sum() for d in fisher_difference_by_hand(model, clean_batches, server, "published")) / 2
    assert torch.allclose(reported, expected, rtol=1e-5), "the mean over 2 tensors of the clean Delta's sums"
    honest = SDFC().client_hook().after_training(client, model, local_batches, lambda: iter(server))[SCORE]
    assert not torch.allclose(honest, reported), "the poisoned score differs, so the test can fail"


# lambda is raised from the paper's 1 so that the calibration term moves the local models
# by far more than the tolerance (lr * 2 * lambda * max Delta stays well below 1).
CALIBRATION_LAMBDA = 20.0
MODEL_ATOL = 1e-6


@pytest.mark.parametrize("estimator", ["empirical", "published"])
def test_sdfc_in_the_loop_against_an_independent_recomputation(tiny_root, tmp_path, estimator):
    """Two rounds, 5 clients (3 and 4 attack). For every client and round, redone here:
    the local training with the calibration term (SGD by hand, anchored at the client's
    previous model with its previous Delta); Delta = |F(w_k, D_k) - F(w_k, D_val)| at the
    trained model with Fisher matrices from explicit loops; s_k; the softmax weights in
    numpy; the new global model as the weighted mean of the client models."""
    attack = PixelPattern(malicious_fraction=0.4)
    exp = tiny_experiment(tiny_root, tmp_path, attack=attack,
                          data=DataConfig(root=str(tiny_root), download=False, train_subset=400, server_size=64),
                          defense=SDFC(calibration_lambda=CALIBRATION_LAMBDA, estimator=estimator),
                          federation=FederationConfig(num_clients=5, rounds=2, final_rounds=1))
    run = FederatedRun(exp)
    data, train, hook, seed = run.data, exp.train, exp.defense.hook, exp.seed
    trained: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    train_client = run.train_client

    def recording(client):
        result = train_client(client)
        trained[client.client_id] = (flat_params(run.model).clone(), result.update.detach().clone())
        return result

    run.train_client = recording
    model = build_model("simple_cnn", data.num_classes, 3, int(data.client_pool.images.shape[-1]))
    shapes = [p.shape for p in model.parameters()]

    def tensors(flat):
        return [chunk.view(shape) for chunk, shape in zip(flat.split([s.numel() for s in shapes]), shapes)]

    def train_by_hand(cid, r, start, plan, anchor, delta):
        load_flat(model, start)
        anchor = tensors(anchor)

        def calibration():
            terms = (((p - q) ** 2 * d).sum() for p, q, d in zip(model.parameters(), anchor, delta))
            return CALIBRATION_LAMBDA * sum(terms)

        batches = endless_training_batches(run.client_sets[cid], data.pipeline, train,
                                           torch_generator(seed, "train", r, cid), poison=plan)
        sgd_by_hand(model, batches, train.local_steps, train.lr, train.momentum, train.weight_decay, calibration)
        return flat_params(model).clone()

    mine: dict[int, tuple[torch.Tensor, list[torch.Tensor]]] = {}  # client -> (anchor, Delta), by hand
    for r in range(2):
        start = run.global_params.detach().cpu().clone()
        trained.clear()
        record = run.run_round(r)
        assert record["clients"] == [0, 1, 2, 3, 4] and record["attacking"] == [False] * 3 + [True] * 2
        scores, client_models = [], []
        for cid in record["clients"]:
            plan = attack.poison_plan(run.client_info(cid, r), len(run.client_sets[cid]))
            assert (plan is not None) == record["attacking"][cid]

            def local_batches():
                generator = torch_generator(seed, "train", r, cid, 1)
                return iterate_batches(run.client_sets[cid], data.pipeline, train.batch_size, generator, poison=plan)

            def server_batches():
                generator = torch_generator(seed, "train", r, cid, 2)
                return iterate_batches(data.server, data.pipeline, train.batch_size, generator)

            if cid not in mine:  # first participation: Delta and anchor of the starting model
                load_flat(model, start)
                mine[cid] = (start, fisher_difference_by_hand(model, local_batches(), server_batches(), estimator))
            local_model, update = trained[cid]
            assert torch.equal(update, local_model - start), "the update is the trained model minus the global one"

            # The local model: SGD + lambda * sum Delta (theta - theta_prev)^2, by hand.
            anchor, delta = mine[cid]
            by_hand = train_by_hand(cid, r, start, plan, anchor, delta)
            np.testing.assert_allclose(local_model.numpy(), by_hand.numpy(), rtol=0, atol=MODEL_ATOL)
            without = train_by_hand(cid, r, start, plan, anchor, [torch.zeros_like(d) for d in delta])
            assert (by_hand - without).abs().max() > 100 * MODEL_ATOL, "the calibration term matters here"
            if r > 0:
                wrong_anchor = train_by_hand(cid, r, start, plan, start, delta)
                assert (by_hand - wrong_anchor).abs().max() > 100 * MODEL_ATOL, "and so does its anchor"

            # (a) s_k = mean over tensors of the sum of Delta_k in the tensor, at the trained model.
            load_flat(model, local_model)
            delta = fisher_difference_by_hand(model, local_batches(), server_batches(), estimator)
            scores.append(float(np.mean([d.double().sum().item() for d in delta])))
            for stored, expected in zip(hook.delta[cid], delta):
                assert torch.allclose(stored, expected, rtol=1e-3, atol=1e-7)

            # (c) the anchor kept for the next round is this trained local model.
            stored = torch.cat([p.detach().reshape(-1).cpu() for p in hook.previous[cid]])
            assert torch.equal(stored, local_model)
            np.testing.assert_allclose(stored.double().numpy(), (start + update).double().numpy(), rtol=0, atol=1e-7)
            assert (stored - start).abs().max() > 1e-3, "it is not the starting global model"
            mine[cid] = (local_model, delta)
            client_models.append(local_model.double().numpy())

        np.testing.assert_allclose(record["defense"]["scores"], scores, rtol=1e-5)
        # (b) weights = softmax(-(s - min s) / (max s - min s)), and the weighted mean of the models.
        s = np.array(scores)
        z = np.exp(-(s - s.min()) / (s.max() - s.min()))
        weights = z / z.sum()
        np.testing.assert_allclose(record["weights"], weights, rtol=0, atol=1e-6)
        expected = weights @ np.stack(client_models)
        np.testing.assert_allclose(run.global_params.double().cpu().numpy(), expected, rtol=0, atol=1e-6)
        assert np.abs(expected - np.stack(client_models).mean(axis=0)).max() > 1e-4, "not the plain mean"
    assert set(hook.delta) == set(range(5))


def test_both_empirical_fisher_paths_match_a_per_sample_loop():
    from fedbench.fisher import _layerwise_supported, layerwise_empirical_fisher, vmap_empirical_fisher
    from fedbench.models import build_model

    torch.manual_seed(1)
    model = build_model("simple_cnn", 10, 3, 32).to(memory_format=torch.channels_last)
    x, y = torch.randn(9, 3, 32, 32).contiguous(memory_format=torch.channels_last), torch.randint(0, 10, (9,))
    batches = [(x[:5], y[:5]), (x[5:], y[5:])]
    layerwise = layerwise_empirical_fisher(model, batches, _layerwise_supported(model))
    vmapped = vmap_empirical_fisher(model, batches)
    loop = fisher_by_per_sample_loop(model, x, y)
    for a, b, c in zip(layerwise, vmapped, loop):
        assert torch.allclose(a, c, atol=1e-7, rtol=1e-4) and torch.allclose(b, c, atol=1e-7, rtol=1e-4)
    with_batchnorm = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    assert _layerwise_supported(with_batchnorm) is None, "BatchNorm goes the vmap way"
