"""Krum and Multi-Krum against explicit float64 pairwise distances, where a float32 Gram
matrix fails: updates sharing an offset 1000x larger than their spread."""

import numpy as np
import torch

from defenses.base import DefenseSetup, RoundContext
from defenses.krum import Krum
from defenses.multi_krum import MultiKrum
from fedbench.params import ParameterLayout

N, DIM, F = 20, 20_000, 4


def offset_updates() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    spread = torch.randn(N, DIM, generator=generator) * 1e-3
    spread[:, :50] += torch.linspace(0, 2e-3, N).unsqueeze(1)  # distinct, close scores
    return torch.randn(DIM, generator=generator) + spread  # offset ~1 = 1000x the spread


def reference_scores(updates: np.ndarray, f: int) -> np.ndarray:
    """Krum score of each row from explicit float64 pairwise differences."""
    n = len(updates)
    distances = np.array([[np.sum((updates[i] - updates[j]) ** 2) for j in range(n)] for i in range(n)])
    return np.array([np.sort(np.delete(distances[i], i))[: n - f - 2].sum() for i in range(n)])


def aggregate(defense, updates: torch.Tensor):
    defense.setup(DefenseSetup(N, N, F, ParameterLayout(torch.nn.Linear(1, 1))))
    ctx = RoundContext(0, torch.arange(N), torch.zeros(DIM), torch.ones(N, dtype=torch.int64))
    return defense.aggregate(updates, torch.ones(N), ctx)


def test_krum_picks_the_float64_reference_choice_despite_a_large_shared_offset():
    updates = offset_updates()
    expected = reference_scores(updates.double().numpy(), F)
    result = aggregate(Krum(f=F), updates)
    assert np.allclose(result.info["scores"], expected, rtol=1e-9)
    chosen = int(np.argmin(expected))
    assert int(torch.argmax(result.weights)) == chosen
    assert torch.equal(result.update, updates[chosen])


def test_multi_krum_averages_the_reference_set_despite_a_large_shared_offset():
    updates = offset_updates()
    expected = reference_scores(updates.double().numpy(), F)
    result = aggregate(MultiKrum(f=F), updates)
    chosen = sorted(np.argsort(expected, kind="stable")[: N - F].tolist())
    assert result.weights.nonzero().squeeze(1).tolist() == chosen
    mean = updates.double().numpy()[chosen].mean(axis=0)
    assert np.allclose(result.update.double().numpy(), mean, rtol=0, atol=1e-6)
