"""Backdoors that adapt: model replacement's boost, Neurotoxin's frozen coordinates, and the
attacker that reports the lowest SDFC score."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from attacks.base import AttackSetup, ClientInfo
from attacks.cosine_constrained import CosineConstrained
from attacks.neurotoxin import Neurotoxin
from attacks.norm_bounded import NormBounded
from attacks.pixel_pattern import PixelPattern
from conftest import spy_on_clients, tiny_experiment
from defenses.base import DefenseSetup, RoundContext
from defenses.fedavg import FedAvg
from defenses.sdfc import SCORE, SDFC
from fedbench.data import ImagePipeline
from fedbench.engine import FederatedRun
from fedbench.experiment import FederationConfig

ATTACKER = ClientInfo(3, 1, malicious=True, attacking=True, attacker_rank=0)


def test_model_replacement_boost_n_over_eta_carries_the_whole_update():
    # n = 4 equally weighted clients, server lr 0.5: boost 4 / 0.5 = 8.
    honest = torch.tensor([2.0, -2.0])
    sent = PixelPattern(scale=8.0).craft_update(honest, ATTACKER)
    benign = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    defense = FedAvg()
    defense.setup(DefenseSetup(num_clients=4, clients_per_round=4, expected_malicious=1, layout=None))
    ctx = RoundContext(round=0, client_ids=torch.arange(4), global_params=torch.zeros(2),
                       local_steps=torch.full((4,), 1))
    step = 0.5 * defense.aggregate(torch.cat([benign, sent.unsqueeze(0)]), torch.ones(4), ctx).update
    # 0.5 * (1/4) * ((2, 2) + (16, -16)) = (2.25, -1.75) = honest + (0.5 / 4) * benign sum
    assert step.tolist() == [2.25, -1.75]


def ready_neurotoxin(top_k_percent: float) -> Neurotoxin:
    attack = Neurotoxin(top_k_percent=top_k_percent)
    pipeline = ImagePipeline((0.5,), (0.5,), channels=1, augment=False, hflip=False, crop_padding=0)
    attack.setup(AttackSetup(10, 10, 1, 28, pipeline, torch.device("cpu"), seed=0))
    return attack


def test_neurotoxin_freezes_the_top_k_percent_of_the_last_global_change():
    attack = ready_neurotoxin(top_k_percent=20.0)  # 2 of 10 coordinates
    model = torch.nn.Linear(4, 2)  # 8 + 2 = 10 parameters
    assert attack.step_hook(ATTACKER, model) is None, "round 0: no global change seen yet, nothing frozen"
    attack.round_start(0, torch.zeros(10))
    attack.round_start(1, torch.tensor([0.1, -3.0, 0.2, 0.0, 2.5, 0.3, -0.1, 0.0, 0.4, 1.0]))
    assert attack.frozen.nonzero().flatten().tolist() == [1, 4], "|-3.0| and |2.5| are the largest changes"
    start = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()
    freeze = attack.step_hook(ATTACKER, model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    freeze()
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    moved = (after != start).tolist()
    assert moved == [True, False, True, True, False, True, True, True, True, True]


def test_neurotoxin_updates_are_zero_on_the_frozen_coordinates_in_the_loop(tiny_root, tmp_path):
    attack = Neurotoxin(top_k_percent=10.0, malicious_fraction=0.4)
    exp = tiny_experiment(tiny_root, tmp_path, attack=attack,
                          federation=FederationConfig(num_clients=5, rounds=2, final_rounds=1))
    run = FederatedRun(exp)
    first_global = run.global_params.clone()
    run.run_round(0)
    second_global = run.global_params.clone()
    sent = spy_on_clients(run)
    run.run_round(1)
    change = (second_global - first_global).abs().numpy()
    count = math.ceil(0.10 * len(change))
    frozen = np.zeros(len(change), dtype=bool)
    frozen[np.argsort(-change, kind="stable")[:count]] = True  # the top 10% by hand (ties: no exact ties here)
    for client in (3, 4):
        update = sent[client].numpy()
        assert (update[frozen] == 0).all(), "the attacker moved a frozen coordinate"
        assert (update[~frozen] != 0).mean() > 0.5, "the other coordinates do move"
    assert (sent[0].numpy()[frozen] != 0).mean() > 0.5, "benign clients are not masked, so the check can fail"


def test_an_adaptive_attacker_can_report_the_lowest_sdfc_score():
    hook = SDFC().client_hook()
    protocol = PixelPattern(adaptive=True, adaptive_report="lowest").client_protocol(ATTACKER, hook)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    batches = [(torch.randn(8, 1, 2, 2), torch.randint(0, 3, (8,)))]
    uploads = protocol.after_training(ATTACKER, model, lambda clean=False: iter(batches), lambda: iter(batches))
    assert uploads[SCORE].item() == 0.0
    assert protocol.before_training(ATTACKER, model, None, None) is None, "and skips the calibration"
    honest = SDFC().client_hook().after_training(ATTACKER, model, lambda clean=False: iter(batches),
                                                  lambda: iter(list(reversed(batches))))
    assert honest[SCORE].item() >= 0.0


def test_lowest_report_wins_the_largest_sdfc_weight():
    defense = SDFC()
    defense.setup(DefenseSetup(num_clients=3, clients_per_round=3, expected_malicious=1, layout=None))
    ctx = RoundContext(round=0, client_ids=torch.arange(3), global_params=torch.zeros(1),
                       local_steps=torch.full((3,), 1), uploads={SCORE: torch.tensor([1.0, 2.0, 0.0])})
    weights = defense.aggregate(torch.zeros(3, 1), torch.ones(3), ctx).weights
    # normalised scores (0.5, 1, 0): weights e^-0.5, e^-1, e^0 over their sum
    expected = np.exp([-0.5, -1.0, 0.0]) / np.exp([-0.5, -1.0, 0.0]).sum()
    assert weights.tolist() == pytest.approx(expected.tolist(), rel=1e-6)


def test_norm_bounded_updates_stay_within_the_radius(tiny_root, tmp_path):
    attack = NormBounded(radius=0.05, malicious_fraction=0.4)
    exp = tiny_experiment(tiny_root, tmp_path, attack=attack,
                          federation=FederationConfig(num_clients=5, rounds=1, final_rounds=1))
    norms = np.array(FederatedRun(exp).run_round(0)["update_norms"])
    assert (norms[3:] <= 0.05 * (1 + 1e-5)).all() and (norms[3:] > 0.04).all(), "pushed out to the ball's edge"
    assert (norms[:3] > 0.05).all(), "benign clients are not projected, so the check can fail"


def test_norm_bounded_estimates_the_radius_from_its_own_clean_update(tiny_root, tmp_path):
    attack = NormBounded(malicious_fraction=0.4)
    exp = tiny_experiment(tiny_root, tmp_path, attack=attack,
                          federation=FederationConfig(num_clients=5, rounds=1, final_rounds=1))
    run = FederatedRun(exp)
    start = run.global_params.clone()
    clean = {c: float(run.clean_update(run.client_info(c, 0)).norm()) for c in (3, 4)}
    assert torch.equal(run.global_params, start)
    norms = run.run_round(0)["update_norms"]
    for client in (3, 4):
        assert attack.last_radius[client] == pytest.approx(clean[client], rel=1e-6), "the same clean training"
        assert norms[client] <= attack.last_radius[client] * (1 + 1e-5)
    benign = np.median(norms[:3])
    assert 0.2 * benign < attack.last_radius[3] < 5 * benign, "a clean update's norm is a benign-sized norm"


def test_cosine_term_is_weight_times_one_minus_the_cosine_to_the_clean_update():
    honest = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0])
    attack = CosineConstrained(weight=3.0)
    pipeline = ImagePipeline((0.5,), (0.5,), channels=1, augment=False, hflip=False, crop_padding=0)
    attack.setup(AttackSetup(10, 10, 1, 28, pipeline, torch.device("cpu"), seed=0,
                             clean_update=lambda client: honest))
    model = torch.nn.Linear(4, 2)  # 8 weights then 2 biases: the flat order of the update
    term = attack.before_training(ATTACKER, model)
    assert term().item() == 0.0, "no move yet: no term"
    with torch.no_grad():
        model.weight[0, 0] += 2.0  # update (2, 0, ..., 0, 0, 0)
        model.bias[1] += 2.0  # update (..., 0, 2)
    # ||u|| = sqrt(8); cos((2, 0.., 2), (1, 0.., 2)) = (2 + 4) / (sqrt(8) * sqrt(5))
    expected = 3.0 * math.sqrt(8.0) * (1.0 - 6.0 / (math.sqrt(8.0) * math.sqrt(5.0)))
    value = term()
    assert value.item() == pytest.approx(expected, rel=1e-6)
    value.backward()
    # d/du of sqrt(8) * (1 - u.g / (|u| |g|)) with |u| held: -sqrt(8) * (g/(|u||g|) - cos u/|u|^2);
    # on u_1 (weight[0, 0]): g_1 = 1, u_1 = 2
    cos = 6.0 / (math.sqrt(8.0) * math.sqrt(5.0))
    grad_u1 = -math.sqrt(8.0) * (1.0 / (math.sqrt(8.0) * math.sqrt(5.0)) - cos * 2.0 / 8.0)
    assert model.weight.grad[0, 0].item() == pytest.approx(3.0 * grad_u1, rel=1e-5)


def test_cosine_constraint_keeps_the_backdoor_update_closer_to_the_clean_one(tiny_root, tmp_path):
    cosines = {}
    for weight in (0.0, 10.0):
        attack = CosineConstrained(weight=weight, malicious_fraction=0.4, poison_ratio=1.0)
        exp = tiny_experiment(tiny_root, tmp_path / str(weight), attack=attack,
                              federation=FederationConfig(num_clients=5, rounds=1, final_rounds=1))
        run = FederatedRun(exp)
        clean = run.clean_update(run.client_info(3, 0))
        sent = spy_on_clients(run)
        run.run_round(0)
        cosines[weight] = float(np.dot(sent[3].numpy(), clean.numpy())
                                / (np.linalg.norm(sent[3].numpy()) * np.linalg.norm(clean.numpy())))
    assert cosines[0.0] < 0.5, "the plain backdoor points elsewhere, so the check can fail"
    assert cosines[10.0] > 0.9, cosines
