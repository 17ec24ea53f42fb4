"""CRFL: the clipped and perturbed global model, and the parameter-smoothing certification."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_experiment
from defenses.base import DefenseSetup, FinalView, RoundContext
from defenses.crfl import CRFL
from fedbench.engine import FederatedRun, run_experiment
from fedbench.experiment import FederationConfig


def context(round_index: int, global_params: torch.Tensor, seed: int = 0) -> RoundContext:
    generator = torch.Generator().manual_seed(seed)
    return RoundContext(round=round_index, client_ids=torch.arange(2), global_params=global_params,
                        local_steps=torch.ones(2, dtype=torch.long), generator=generator)


def ready(**options) -> CRFL:
    defense = CRFL(**options)
    defense.setup(DefenseSetup(num_clients=2, clients_per_round=2, expected_malicious=0, layout=None))
    return defense


def test_the_model_is_clipped_to_the_initial_norm_plus_growth():
    defense = ready(sigma=0.0)
    start = torch.tensor([3.0, 4.0])  # norm 5: rho_1 = 5.1, rho_2 = 5.2
    updates = torch.tensor([[3.0, 4.0], [3.0, 4.0]])
    first = defense.aggregate(updates, torch.tensor([10, 30]), context(0, start))
    # w' = (6, 8), norm 10 -> (6, 8) * 5.1 / 10 = (3.06, 4.08); the aggregate is w_1 - w_0
    assert first.update.tolist() == pytest.approx([0.06, 0.08], abs=1e-6)
    assert first.weights.tolist() == pytest.approx([0.25, 0.75])
    second = defense.aggregate(torch.tensor([[0.0, 0.0], [-0.06, -0.08]]), torch.tensor([1, 1]),
                               context(1, torch.tensor([3.06, 4.08])))
    # w' = (3.03, 4.04), norm 5.05 < 5.2: not clipped
    assert second.update.tolist() == pytest.approx([-0.03, -0.04], abs=1e-6)
    assert defense.state_dict() == {"initial_norm": pytest.approx(5.0)}


def test_a_given_clip_start_replaces_the_initial_norm():
    defense = ready(sigma=0.0, clip_start=1.0, clip_growth=0.0)
    out = defense.aggregate(torch.tensor([[0.0, 0.0]] * 2), torch.ones(2), context(0, torch.tensor([3.0, 4.0])))
    assert (torch.tensor([3.0, 4.0]) + out.update).tolist() == pytest.approx([0.6, 0.8], abs=1e-6)


def test_the_training_noise_has_std_sigma():
    d = 200_000
    defense = ready(sigma=0.5, clip_start=1e9)
    out = defense.aggregate(torch.zeros(2, d), torch.ones(2), context(0, torch.zeros(d)))
    noise = out.update.double()
    assert float(noise.mean()) == pytest.approx(0.0, abs=0.005)
    assert float(noise.std()) == pytest.approx(0.5, rel=0.01)


def fixed_view(clean: list[int], triggered: list[int] | None, labels: list[int], target: int | None,
               vary=None) -> FinalView:
    """A view whose model predicts fixed labels (image 0's clean label may follow the noise)."""

    def predict(params: torch.Tensor, count: int):
        predicted = torch.tensor(clean[:count])
        if vary is not None:
            predicted[0] = vary(params)
        return predicted, (torch.tensor(triggered[:count]) if triggered is not None else None)

    return FinalView(torch.zeros(1), predict, torch.tensor(labels), target, 3, torch.Generator().manual_seed(0))


def test_smoothing_counts_majority_votes_and_certifies_with_hoeffding():
    view = fixed_view([0, 1, 2, 1], [2, 2, 0, 2], [0, 1, 1, 2], target=2)
    # every copy votes the same: shares 1 and 0. Correct: images 0 and 1 -> 50%.
    # M = 100: e = sqrt(ln(1000) / 200) = 0.186 -> 0.814 > 0.186, certified.
    many = ready(smoothing_copies=100).final_evaluation(view)
    assert many["smoothed_A"] == pytest.approx(50.0)
    assert many["certified_A"] == pytest.approx(50.0)
    # triggered votes (2, 2, 0, 2): non-target images (labels 0, 1, 1) -> 2 of 3; all -> 3 of 4
    assert many["smoothed_ASR"] == pytest.approx(200 / 3)
    assert many["smoothed_ASR_all"] == pytest.approx(75.0)
    # M = 10: e = sqrt(ln(1000) / 20) = 0.588 -> 0.412 < 0.588, nothing certified
    assert math.sqrt(math.log(1000) / 20) > 0.5
    assert ready(smoothing_copies=10).final_evaluation(view)["certified_A"] == 0.0


def test_a_split_vote_is_smoothed_but_not_certified():
    # image 0 (label 0) is predicted 0 when the noise is positive, else 1: about half each
    view = fixed_view([0, 1], None, [0, 1], target=None, vary=lambda params: 0 if params[0] > 0 else 1)
    numbers = ready(smoothing_copies=400, smoothing_sigma=1.0).final_evaluation(view)
    assert numbers["certified_A"] == pytest.approx(50.0), "image 1 is certified, image 0 is not"
    assert numbers["smoothed_A"] in (50.0, 100.0)
    assert numbers["smoothed_ASR"] is None and numbers["smoothed_ASR_all"] is None


def test_bad_options_and_a_server_lr_other_than_one_are_named():
    env = DefenseSetup(num_clients=2, clients_per_round=2, expected_malicious=0, layout=None, server_lr=0.5)
    named = [name for name, _, _ in CRFL(sigma=-1.0, smoothing_copies=0, alpha=1.0).problems(env)]
    assert named == ["defense.sigma", "defense.smoothing_copies", "defense.alpha", "federation.server_lr"]


def test_crfl_in_the_loop_reports_smoothed_numbers_and_keeps_the_bound(tiny_root, tmp_path):
    defense = CRFL(sigma=0.0, clip_growth=0.0, smoothing_copies=3, smoothing_sigma=0.0, certify_samples=40)
    exp = tiny_experiment(tiny_root, tmp_path, defense=defense,
                          federation=FederationConfig(num_clients=5, rounds=2, final_rounds=1))
    run = FederatedRun(exp)
    start_norm = float(run.global_params.double().norm())
    summary = run.run()
    assert float(run.global_params.double().norm()) <= start_norm * (1 + 1e-6), "rho = the initial norm"
    final = summary["final"]
    assert final["smoothed_ASR"] is None, "no trigger without an attack"
    # smoothing sigma 0: every copy is the plain final model, so smoothed_A is its accuracy on
    # the first 40 test images, and every vote is unanimous (certified = correct for M = 3?
    # e = sqrt(ln(1000) / 6) = 1.07 > 0.5: nothing is certified with 3 copies)
    run.layout.load(run.model, run.global_params)
    run.model.eval()
    with torch.no_grad():
        predicted = run.model(run.data.pipeline(run.data.test.images[:40], train=False)).argmax(dim=1)
    expected = 100.0 * float((predicted == run.data.test.labels[:40]).double().mean())
    assert final["smoothed_A"] == pytest.approx(expected)
    assert final["certified_A"] == 0.0


def test_crfl_is_deterministic(tiny_root, tmp_path):
    finals = []
    for name in ("a", "b"):
        exp = tiny_experiment(tiny_root, tmp_path / name, defense=CRFL(smoothing_copies=4, certify_samples=30),
                              federation=FederationConfig(num_clients=5, rounds=2, final_rounds=1))
        finals.append(run_experiment(exp)["final"])
    assert finals[0] == finals[1]
