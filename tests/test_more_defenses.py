"""RLR, RFA, centered clipping and Bulyan against cases worked out by hand or by an
explicit loop written here."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from defenses.base import DefenseSetup, RoundContext
from defenses.bulyan import Bulyan
from defenses.centered_clipping import CenteredClipping
from defenses.rfa import RFA
from defenses.rlr import RobustLearningRate


def run(defense, rows, counts=None, expected_malicious=0):
    updates = torch.tensor(rows, dtype=torch.float32)
    n = len(updates)
    defense.setup(DefenseSetup(num_clients=n, clients_per_round=n, expected_malicious=expected_malicious, layout=None))
    ctx = RoundContext(round=0, client_ids=torch.arange(n), global_params=torch.zeros(updates.shape[1]),
                       local_steps=torch.full((n,), 5))
    return defense.aggregate(updates, torch.tensor(counts or [1] * n), ctx)


def test_rlr_flips_the_rate_where_signs_disagree():
    rows = [[1, 1, 1], [1, -1, 1], [1, 1, -1], [1, 1, 1]]  # |sum of signs| per coordinate: 4, 2, 2
    out = run(RobustLearningRate(theta=3), rows)
    assert out.update.tolist() == [1.0, -0.5, -0.5]  # mean (1, .5, .5), rates (+, -, -)
    default = run(RobustLearningRate(), rows, expected_malicious=1)  # theta = f + 1 = 2
    assert default.update.tolist() == [1.0, 0.5, 0.5]
    weighted = run(RobustLearningRate(theta=3), rows, counts=[3, 1, 0, 0])
    assert weighted.update.tolist() == [1.0, -0.5, -1.0] and weighted.weights.tolist() == [0.75, 0.25, 0.0, 0.0]


def test_rfa_one_weiszfeld_step_by_hand():
    rows = [[0.0, 0.0], [4.0, 0.0], [0.0, 3.0]]
    out = run(RFA(iterations=1), rows)
    start = np.array([4 / 3, 1.0])  # the mean
    distances = np.linalg.norm(np.array(rows) - start, axis=1)
    assert distances.tolist() == pytest.approx([5 / 3, np.sqrt(73) / 3, np.sqrt(52) / 3])  # by hand
    beta = np.array([1 / 3 / d for d in distances])
    expected = (beta[:, None] * np.array(rows)).sum(axis=0) / beta.sum()
    assert out.update.tolist() == pytest.approx(expected.tolist(), rel=1e-6)
    assert out.weights.tolist() == pytest.approx((beta / beta.sum()).tolist(), rel=1e-6)


def test_rfa_converges_to_the_median_and_shrugs_off_an_outlier():
    out = run(RFA(iterations=300, nu=1e-12), [[0.0], [1.0], [10.0]])
    assert out.update.item() == pytest.approx(1.0, abs=1e-3), "in 1-D the geometric median is the median"
    far = run(RFA(iterations=300, nu=1e-12), [[0.0], [1.0], [1e6]])
    assert far.update.item() == pytest.approx(1.0, abs=1e-3)


def test_centered_clipping_two_rounds_by_hand():
    defense = CenteredClipping(tau=1.0)
    first = run(defense, [[3.0, 4.0], [0.0, 1.0]])  # from 0: clip (3, 4) to (.6, .8); (0, 1) is within tau
    assert first.update.tolist() == pytest.approx([0.3, 0.9])
    assert first.weights.tolist() == pytest.approx([0.2 / 1.2, 1 / 1.2])
    state = defense.state_dict()
    resumed = CenteredClipping(tau=1.0)
    resumed.load_state_dict(state)
    second = run(resumed, [[0.3, 0.9], [0.3, 2.9]])  # offsets (0, 0) and (0, 2) -> clipped (0, 1)
    assert second.update.tolist() == pytest.approx([0.3, 1.4])


def krum_by_loop(points: np.ndarray, f: int) -> int:
    """Index (into points) of the lowest Krum score, by explicit loops; ties to the lowest."""
    m = len(points)
    neighbours = max(m - f - 2, 0)
    scores = []
    for i in range(m):
        distances = sorted(float(((points[i] - points[j]) ** 2).sum()) for j in range(m) if j != i)
        scores.append(sum(distances[:neighbours]))
    return int(np.argmin(scores))


def bulyan_by_loop(rows: np.ndarray, f: int) -> np.ndarray:
    remaining, chosen = list(range(len(rows))), []
    for _ in range(len(rows) - 2 * f):
        chosen.append(remaining.pop(krum_by_loop(rows[remaining], f)))
    selected = rows[chosen]
    beta = len(chosen) - 2 * f
    out = []
    for column in selected.T:
        median = np.median(column)
        closest = sorted(range(len(column)), key=lambda k: (abs(column[k] - median), k))[:beta]
        out.append(np.mean(column[closest]))
    return np.array(out), chosen


def test_bulyan_matches_an_explicit_loop_and_drops_the_outliers():
    rng = np.random.default_rng(4)
    rows = rng.normal(size=(11, 6)).astype(np.float32)
    rows[9] += 50.0
    rows[10] -= 30.0
    out = run(Bulyan(f=2), rows.tolist())
    expected, chosen = bulyan_by_loop(rows.astype(np.float64), 2)
    assert out.update.tolist() == pytest.approx(expected.tolist(), rel=1e-5)
    assert sorted(np.flatnonzero(~out.excluded.numpy()).tolist()) == sorted(chosen)
    assert out.excluded[9] and out.excluded[10]
    assert float(out.weights.sum()) == pytest.approx(1.0)


def test_bulyan_needs_n_at_least_4f_plus_3():
    env = DefenseSetup(num_clients=10, clients_per_round=10, expected_malicious=3, layout=None)
    (field, _, allowed), = Bulyan().problems(env)
    assert field == "defense.f" and "n >= 4f + 3" in allowed and "f <= 1" in allowed
    assert Bulyan(f=1).problems(env) == []


def test_every_subset_of_ties_in_bulyan_is_broken_toward_the_lower_rows():
    rows = [[float(v)] for v in (0, 0, 0, 0, 0, 0, 0)]  # n = 7, f = 1: all tied
    out = run(Bulyan(f=1), rows)
    assert out.excluded.tolist() == [False] * 5 + [True] * 2
    assert list(itertools.islice(out.info["selected"], 5)) == [0, 1, 2, 3, 4]


def test_flame_keeps_the_majority_direction_clips_to_the_median_norm_and_adds_noise():
    from defenses.flame import FLAME

    benign = [[1.0, 0.1], [2.0, 0.2], [3.0, 0.3], [4.0, 0.4], [5.0, 0.5]]  # one direction, norms ~1..5
    attackers = [[-10.0, 9.0], [-9.0, 10.0]]  # another direction, large
    out = run(FLAME(noise_lambda=0.0), benign + attackers)
    assert out.excluded.tolist() == [False] * 5 + [True] * 2
    norms = np.linalg.norm(np.array(benign + attackers), axis=1)
    bound = np.median(norms)  # the median of ALL 7 norms (the 4th largest): ||(4, .4)||
    clipped = [np.array(u) * min(1.0, bound / np.linalg.norm(u)) for u in benign]
    assert out.update.tolist() == pytest.approx(np.mean(clipped, axis=0).tolist(), rel=1e-6)
    assert out.weights.tolist() == pytest.approx([0.2] * 5 + [0.0] * 2)

    wide = [[1.0] * 50_000, [1.1] * 50_000, [0.9] * 50_000]
    noisy = FLAME(noise_lambda=0.5)
    noisy.setup(DefenseSetup(num_clients=3, clients_per_round=3, expected_malicious=0, layout=None))
    ctx = RoundContext(round=0, client_ids=torch.arange(3), global_params=torch.zeros(1),
                       local_steps=torch.full((3,), 5), generator=torch.Generator().manual_seed(0))
    result = noisy.aggregate(torch.tensor(wide), torch.ones(3), ctx).update
    median_norm = float(np.linalg.norm(wide[0]))
    noise = result.double().numpy() - np.mean([np.array(u) * min(1.0, median_norm / np.linalg.norm(u)) for u in wide],
                                             axis=0)
    assert noise.std() == pytest.approx(0.5 * median_norm, rel=0.02), "sigma = lambda * S"


def test_foolsgold_gives_sybils_no_weight_by_hand():
    from defenses.foolsgold import FoolsGold

    # Histories (1, 0), (1, 0), (0, 1): cs_01 = 1, cs_02 = cs_12 = 0, v = (1, 1, 0); pardoning
    # scales cs_2j by 0 / 1; alpha = 1 - max cs = (0, 0, 1) -> rescaled (0, 0, 1) -> 0.99 ->
    # logit: ln(99) + 0.5 = 5.1 -> clipped 1; ln(0) -> 0. Only client 2 counts.
    out = run(FoolsGold(), [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert out.update.tolist() == [0.0, 1.0] and out.excluded.tolist() == [True, True, False]


def test_foolsgold_partial_similarity_and_history_by_hand():
    from defenses.foolsgold import FoolsGold

    defense = FoolsGold()
    # (1, 0), (1, 1), (0, 1): cs_01 = cs_12 = 1/sqrt(2), v equal: no pardoning; alpha = 1 - 0.7071
    # for all -> rescaled to 1 -> 0.99 -> logit clipped to 1: a plain mean.
    first = run(defense, [[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    assert first.update.tolist() == pytest.approx([2 / 3, 2 / 3])
    # Round 2: the histories become (1, 0) + (0, 1) = (1, 1), (1, 1) + (1, 1) = (2, 2), (0, 1) + (1, 0) = (1, 1):
    # all identical -> cs = 1 everywhere -> alpha = 0 for all: nobody counts, the model stays.
    state = defense.state_dict()
    resumed = FoolsGold()
    resumed.load_state_dict(state)
    resumed.setup(defense.env)
    ctx = RoundContext(round=1, client_ids=torch.arange(3), global_params=torch.zeros(2),
                       local_steps=torch.full((3,), 5))
    second = resumed.aggregate(torch.tensor([[0.0, 1.0], [1.0, 1.0], [1.0, 0.0]]), torch.ones(3), ctx)
    assert second.update.tolist() == [0.0, 0.0] and second.excluded.all()


def test_dnc_removes_the_largest_projections_on_the_top_singular_vector():
    from defenses.dnc import DnC

    rows = np.array([[0.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [0.0, 0.1], [10.0, 10.0]])
    out = run(DnC(f=1, niters=2), rows.tolist())
    centred = rows - rows.mean(axis=0)
    top = np.linalg.svd(centred)[2][0]
    scores = (centred @ top) ** 2  # by numpy: the outlier's projection dominates
    assert int(np.argmax(scores)) == 4
    assert out.excluded.tolist() == [False, False, False, False, True]
    assert out.update.tolist() == pytest.approx(rows[:4].mean(axis=0).tolist())


def test_dnc_subsamples_coordinates_from_the_defense_stream():
    from defenses.dnc import DnC

    rng = np.random.default_rng(1)
    rows = rng.normal(size=(8, 30_000)).astype(np.float32)
    rows[[2, 5]] += rng.normal(size=30_000).astype(np.float32) * 3  # two attackers, a shared direction
    defense = DnC(f=2, niters=3, subsample=1000)
    defense.setup(DefenseSetup(num_clients=8, clients_per_round=8, expected_malicious=2, layout=None))

    def once(seed):
        ctx = RoundContext(round=0, client_ids=torch.arange(8), global_params=torch.zeros(1),
                           local_steps=torch.full((8,), 5), generator=torch.Generator().manual_seed(seed))
        return defense.aggregate(torch.tensor(rows), torch.ones(8), ctx)

    first = once(0)
    assert first.excluded[2] and first.excluded[5] and int(first.excluded.sum()) >= 2
    assert torch.equal(first.update, once(0).update)


def finch_level0_by_loop(values: np.ndarray) -> list[int]:
    """FINCH's first partition by hand: i and j are joined when j is i's first neighbour, i
    is j's, or they share a first neighbour; labels are connected components (union-find)."""
    n = len(values)
    first = [min((j for j in range(n) if j != i), key=lambda j: (abs(values[i] - values[j]), j)) for i in range(n)]
    parent = list(range(n))

    def root(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for i in range(n):
        for j in range(n):
            if i != j and (first[i] == j or first[j] == i or first[i] == first[j]):
                parent[root(i)] = root(j)
    roots = [root(i) for i in range(n)]
    return [sorted(set(roots)).index(r) for r in roots]


@pytest.mark.parametrize("chunk", [None, 4], ids=["one block", "blocks of 4 of 6 coordinates"])
def test_fdcr_drops_the_farthest_finch_cluster_and_rescales_by_hand(chunk, monkeypatch):
    from defenses.fdcr import FISHER, FDCR, MinMaxImportance

    if chunk is not None:  # the blocks that keep float64 copies small at n = 50 change no number
        monkeypatch.setattr(MinMaxImportance, "CHUNK", chunk)

    rng = np.random.default_rng(0)
    d = 6
    benign = rng.normal(0.0, 0.1, size=(7, d))
    attackers = rng.normal(0.0, 0.1, size=(3, d)) + np.array([3.0, -3.0, 3.0, 0, 0, 0])
    updates = np.vstack([benign, attackers])
    fisher = rng.uniform(0.0, 1.0, size=(10, d))
    counts = np.arange(10, 20)
    defense = FDCR()
    defense.setup(DefenseSetup(num_clients=10, clients_per_round=10, expected_malicious=3, layout=None))
    ctx = RoundContext(round=0, client_ids=torch.arange(10), global_params=torch.zeros(d),
                       local_steps=torch.full((10,), 5), uploads={FISHER: torch.tensor(fisher)})
    out = defense.aggregate(torch.tensor(updates, dtype=torch.float32), torch.tensor(counts), ctx)

    importance = (fisher - fisher.min(axis=1, keepdims=True)) / np.ptp(fisher, axis=1, keepdims=True)
    p = counts / counts.sum()
    weighted = importance * updates
    distances = np.linalg.norm(weighted - p @ weighted, axis=1)
    labels = np.array(finch_level0_by_loop(distances))
    assert len(set(labels)) > 1, "the case separates, so the filtering path is tested"
    worst = max(set(labels), key=lambda c: distances[labels == c].mean())
    excluded = labels == worst
    assert excluded[7:].all() and not excluded[:7].any(), "the three attackers form the farthest cluster"
    kept = np.where(excluded, 0.0, p) / np.where(excluded, 0.0, p).sum()
    expected = kept @ (2 / (1 + np.exp(-importance)) * updates)
    assert out.excluded.tolist() == excluded.tolist()
    assert out.update.tolist() == pytest.approx(expected.tolist(), rel=1e-5, abs=1e-7)
    assert out.weights.tolist() == pytest.approx(kept.tolist(), rel=1e-6)
    assert out.info["distances"] == pytest.approx(distances.tolist(), rel=1e-6)  # float32 updates


def test_fdcr_runs_in_the_loop_with_per_parameter_fisher_uploads(tiny_root, tmp_path):
    from attacks.pixel_pattern import PixelPattern
    from conftest import tiny_experiment
    from defenses.fdcr import FDCR
    from fedbench.engine import FederatedRun
    from fedbench.experiment import FederationConfig

    exp = tiny_experiment(tiny_root, tmp_path, attack=PixelPattern(malicious_fraction=0.4), defense=FDCR(),
                          federation=FederationConfig(num_clients=5, rounds=1, final_rounds=1))
    run = FederatedRun(exp)
    record = run.run_round(0)
    assert len(record["defense"]["distances"]) == 5 and all(np.isfinite(record["defense"]["distances"]))
    assert abs(sum(record["weights"]) - 1.0) < 1e-6
