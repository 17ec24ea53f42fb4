"""SDFC piece by piece: the Fisher estimators, the weight rule, the calibration term, and the loop."""

import math

import pytest
import torch

from attacks.pixel_pattern import PixelPattern
from attacks.base import ClientInfo
from conftest import tiny_experiment
from defenses.base import DefenseSetup, RoundContext
from defenses.sdfc import SCORE, SDFC, difference_score, exp_neg_weights
from fedbench.engine import FederatedRun, FederationConfig
from fedbench.fisher import diagonal_fisher


def two_class_linear() -> torch.nn.Module:
    model = torch.nn.Linear(1, 2)
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    return model


def fisher_by_per_sample_loop(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """The empirical Fisher the slow way: one backward pass per sample."""
    total = [torch.zeros_like(p) for p in model.parameters()]
    for i in range(len(y)):
        model.zero_grad()
        torch.log_softmax(model(x[i:i + 1]), dim=1)[0, y[i]].backward()
        for acc, p in zip(total, model.parameters()):
            acc += p.grad**2 / len(y)
    return total


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
    hook.delta[0], hook.previous[0] = delta, previous
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
    hook.delta[0], hook.previous[0] = [torch.ones(1)], [torch.zeros(1)]
    model = torch.nn.Linear(1, 1, bias=False)
    adaptive = ClientInfo(0, 1, malicious=True, attacking=True, attacker_rank=0, adaptive=True)
    assert hook.before_training(adaptive, model, None, None) is None
    weights_only = SDFC(mode="weights_only").client_hook()
    weights_only.delta[0], weights_only.previous[0] = [torch.ones(1)], [torch.zeros(1)]
    assert weights_only.before_training(ClientInfo(0, 1), model, None, None) is None


@pytest.mark.parametrize("estimator", ["empirical", "published"])
def test_sdfc_in_the_loop_weights_follow_the_scores(tiny_root, tmp_path, estimator):
    exp = tiny_experiment(tiny_root, tmp_path, attack=PixelPattern(malicious_fraction=0.4),
                          defense=SDFC(estimator=estimator),
                          federation=FederationConfig(num_clients=5, rounds=2, final_rounds=1))
    run = FederatedRun(exp)
    run.run()
    for record in run.records:
        scores = torch.tensor(record["defense"]["scores"], dtype=torch.float64)
        assert torch.allclose(torch.tensor(record["weights"], dtype=torch.float64), exp_neg_weights(scores),
                              atol=1e-6)
    hook = exp.defense.hook
    assert set(hook.delta) == set(range(5)), "every client keeps its Delta for the next round's calibration"
    assert all(torch.isfinite(d).all() for deltas in hook.delta.values() for d in deltas)


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
