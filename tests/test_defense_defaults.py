"""Every baseline gets the same knowledge: by default Krum, Multi-Krum and trimmed mean all
assume f = the expected number of attackers among the selected clients."""

import numpy as np
import pytest
import torch

from attacks.pixel_pattern import PixelPattern
from defenses.base import DefenseSetup, RoundContext
from defenses.krum import Krum
from defenses.multi_krum import MultiKrum
from defenses.trimmed_mean import TrimmedMean
from fedbench.experiment import Experiment, FederationConfig, defense_setup, expected_malicious

# Column 0: 1 2 3 4 100 5 6; column 1: -50 0 1 2 3 -40 60.
CASE = [[1, -50], [2, 0], [3, 1], [4, 2], [100, 3], [5, -40], [6, 60]]


def trimmed_reference(values: list[list[float]], k: int) -> np.ndarray:
    """Per column: sort, drop k from each end, average (numpy)."""
    ordered = np.sort(np.array(values, dtype=np.float64), axis=0)
    return ordered[k : len(values) - k].mean(axis=0)


def aggregate(defense, expected: int):
    n = len(CASE)
    defense.setup(DefenseSetup(n, n, expected, layout=None))
    ctx = RoundContext(0, torch.arange(n), torch.zeros(2), torch.ones(n, dtype=torch.int64))
    return defense.aggregate(torch.tensor(CASE, dtype=torch.float32), torch.ones(n), ctx)


@pytest.mark.parametrize("expected", [0, 1, 2, 3])
def test_trimmed_mean_trims_the_expected_attackers_per_side_by_default(expected):
    out = aggregate(TrimmedMean(), expected)
    assert out.info["trimmed_per_side"] == expected
    assert np.allclose(out.update.numpy(), trimmed_reference(CASE, expected))


def test_trimmed_mean_f_and_beta_still_override():
    # By hand: f = 1 drops 1 and 100 / -50 and 60: column 0 mean(2,3,4,5,6) = 4, column 1 mean(-40,0,1,2,3) = -6.8.
    assert np.allclose(aggregate(TrimmedMean(f=1), expected=3).update.numpy(), [4.0, -6.8])
    assert aggregate(TrimmedMean(beta=0.3), expected=0).info["trimmed_per_side"] == 2  # floor(0.3 * 7)


def test_every_distance_and_trimming_baseline_assumes_the_same_f_in_the_paper_setting():
    # 10 clients, 30% malicious, all selected: 3 expected attackers, as the papers give every defense.
    exp = Experiment(attack=PixelPattern(malicious_fraction=0.3), defense=TrimmedMean(),
                     federation=FederationConfig(num_clients=10))
    assert expected_malicious(exp) == 3
    setup = defense_setup(exp, layout=None)
    assert TrimmedMean().problems(setup) == []
    trimmed, krum, multi = TrimmedMean(), Krum(), MultiKrum()
    for defense in (trimmed, krum, multi):
        defense.setup(setup)
    assert trimmed.trimmed(10) == 3
    updates = torch.randn(10, 5, generator=torch.Generator().manual_seed(0))
    ctx = RoundContext(0, torch.arange(10), torch.zeros(5), torch.ones(10, dtype=torch.int64))
    assert krum.aggregate(updates, torch.ones(10), ctx).info["f"] == 3
    assert multi.aggregate(updates, torch.ones(10), ctx).info["m"] == 7


def test_trimming_too_much_is_named_before_training():
    n = 7
    setup = DefenseSetup(n, n, 4, layout=None)
    assert [p[0] for p in TrimmedMean().problems(setup)] == ["defense.f"]
    assert [p[0] for p in TrimmedMean(f=1, beta=0.1).problems(setup)] == ["defense.beta"]
