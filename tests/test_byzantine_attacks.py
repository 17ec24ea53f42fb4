"""The untargeted (Byzantine) attacks, each against a case worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from attacks.alie import ALIE, z_max
from attacks.base import AttackSetup, ClientInfo, ServerView
from attacks.gaussian import GaussianNoise
from attacks.ipm import IPM
from attacks.label_flip import LabelFlip
from attacks.min_max import MinMax, largest_gamma
from attacks.min_sum import MinSum
from attacks.sign_flip import SignFlip
from fedbench.data import ImagePipeline

ATTACKER = ClientInfo(9, 0, malicious=True, attacking=True, attacker_rank=0)


def view(rows, own, seed: int = 0) -> ServerView:
    updates = torch.tensor(rows, dtype=torch.float32)
    n = len(updates)
    own = torch.tensor(own, dtype=torch.bool)
    return ServerView(round=0, updates=updates, own=own, client_ids=torch.arange(n),
                      num_samples=torch.full((n,), 10), global_params=torch.zeros(updates.shape[1]),
                      expected_malicious=int(own.sum()), generator=torch.Generator().manual_seed(seed))


def test_sign_flip_sends_minus_s_times_the_honest_update():
    update = torch.tensor([1.0, -2.0])
    assert SignFlip().craft_update(update, ATTACKER).tolist() == [-1.0, 2.0]
    assert SignFlip(strength=2.0, scale=3.0).craft_update(update, ATTACKER).tolist() == [-6.0, 12.0]


def test_gaussian_rows_are_seeded_draws_with_the_given_sigma():
    rows = [[0.0] * 100_000] * 4
    crafted = GaussianNoise(sigma=0.5).craft_round(view(rows, [False, False, True, True], seed=1))
    assert crafted.shape == (2, 100_000)
    assert abs(float(crafted.std()) - 0.5) < 0.005 and abs(float(crafted.mean())) < 0.005
    assert not torch.equal(crafted[0], crafted[1]), "each attacker its own draw"
    again = GaussianNoise(sigma=0.5).craft_round(view(rows, [False, False, True, True], seed=1))
    assert torch.equal(crafted, again), "the same stream gives the same noise"


def test_label_flip_reverses_every_label_and_keeps_the_images():
    attack = LabelFlip()
    pipeline = ImagePipeline((0.5,), (0.5,), channels=1, augment=False, hflip=False, crop_padding=0)
    attack.setup(AttackSetup(10, 10, 1, 28, pipeline, torch.device("cpu"), seed=0))
    images = torch.randn(3, 1, 28, 28)
    plan = attack.poison_plan(ATTACKER, 50)
    out_images, out_labels = plan.apply(images, torch.tensor([0, 3, 9]), torch.arange(3))
    assert out_labels.tolist() == [9, 6, 0] and torch.equal(out_images, images)
    resting = ClientInfo(9, 1, malicious=True, attacking=False, attacker_rank=0)
    assert attack.poison_plan(resting, 50) is None, "honest data in rounds it does not attack"


def test_ipm_sends_minus_epsilon_times_the_benign_mean():
    rows = [[1.0, 2.0], [3.0, 4.0], [100.0, 100.0], [-50.0, 7.0]]
    crafted = IPM(epsilon=0.5).craft_round(view(rows, [False, False, True, True]))
    assert crafted.tolist() == [[-1.0, -1.5], [-1.0, -1.5]]  # mean of the benign rows is (2, 3)
    own = IPM(epsilon=2.0, knowledge="own").craft_round(view(rows, [False, False, True, True]))
    assert own.tolist() == [[-50.0, -107.0], [-50.0, -107.0]]  # mean of its own rows is (25, 53.5)


def test_alie_z_max_from_the_paper():
    # n = 10, f = 3: s = floor(6) - 3 = 3 supporters, Phi^-1(7 / 10) = 0.5244005127
    assert z_max(10, 3) == pytest.approx(0.5244005127080407, abs=1e-12)
    # n = 50, f = 24 (the paper's example): s = 26 - 24 = 2, Phi^-1(48 / 50) = 1.7506860713
    assert z_max(50, 24) == pytest.approx(1.7506860712521692, abs=1e-9)


def test_alie_sends_mean_minus_z_std_of_the_benign_updates():
    rows = [[1.0, 0.0], [3.0, 2.0], [5.0, 4.0], [9.0, 9.0], [9.0, 9.0]]
    own = [False, False, False, True, True]
    # benign mean (3, 2), Bessel std (2, 2)
    assert ALIE(z=1.0).craft_round(view(rows, own)).tolist() == [[1.0, 0.0], [1.0, 0.0]]
    # z_max(n = 5, f = 2): s = floor(3.5) - 2 = 1, Phi^-1(4 / 5) = 0.8416212336
    crafted = ALIE().craft_round(view(rows, own))
    assert crafted[0].tolist() == pytest.approx([3 - 2 * 0.8416212336, 2 - 2 * 0.8416212336], abs=1e-6)


def test_the_gamma_search_finds_the_largest_accepted_gamma():
    assert largest_gamma(lambda g: g <= 3.3) == pytest.approx(3.3, abs=1e-5)
    assert largest_gamma(lambda g: g <= 25.0) == pytest.approx(20.0, abs=1e-4), \
        "steps 5 + 2.5 + 1.25 + ... up from 10: the search never passes 2 * gamma_init"
    assert largest_gamma(lambda g: False) == 0.0


# Reference updates (0, 0), (2, 0), (0, 2): mean (2/3, 2/3); with nabla_p = -sign(mean) = (-1, -1)
# the candidate is (a, a), a = 2/3 - gamma.
# Min-Max: max pairwise squared distance 8 (between (2, 0) and (0, 2)); the farthest reference
# from (a, a) is (2, 0): (a - 2)^2 + a^2 = 8 -> a = 1 - sqrt(3).
# Min-Sum: the largest summed squared distance of a reference is 4 + 8 = 12; the candidate's is
# 2a^2 + 2((a - 2)^2 + a^2) = 6a^2 - 8a + 8 = 12 -> a = (4 - sqrt(40)) / 6.
REFERENCE = [[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [7.0, 7.0]]
OWN = [False, False, False, True]


@pytest.mark.parametrize("attack,a", [(MinMax, 1 - math.sqrt(3)), (MinSum, (4 - math.sqrt(40)) / 6)])
def test_min_max_and_min_sum_by_hand(attack, a):
    crafted = attack(perturbation="sign").craft_round(view(REFERENCE, OWN))
    assert crafted.shape == (1, 2)
    assert crafted[0].tolist() == pytest.approx([a, a], abs=1e-4)


def test_min_max_perturbations_by_hand():
    rows = torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 4.0]])
    from attacks.min_max import perturbation

    assert perturbation(rows, "sign").tolist() == [-1.0, -1.0]
    assert perturbation(rows, "std").tolist() == [-2.0, -2.0]
    assert perturbation(rows, "unit_vec").tolist() == pytest.approx([-3 / 13 ** 0.5, -2 / 13 ** 0.5])
