"""Cross-cell cohorts: runs trained together equal the same runs trained alone."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from attacks.badnets import BadNets
from attacks.pixel_pattern import PixelPattern
from conftest import tiny_experiment
from defenses.median import Median
from defenses.sdfc import SDFC
from fedbench.client import LocalTrainConfig
from fedbench.engine import FederatedRun
from fedbench.errors import FedbenchError
from fedbench.experiment import FederationConfig
from fedbench.together import run_together

TRAIN = LocalTrainConfig(local_epochs=1, local_steps=None, batch_size=32, cohort=True)


def two_cells(tiny_root, out, train=TRAIN):
    """SDFC against the pixel pattern (seed 0, 2 rounds) and the median against BadNets
    (seed 1, 3 rounds): other attacks, defenses, seeds, client hooks and lengths."""
    return [
        tiny_experiment(tiny_root, out / "a", attack=PixelPattern(malicious_fraction=0.4), defense=SDFC(), train=train,
                        federation=FederationConfig(num_clients=5, rounds=2, final_rounds=1)),
        tiny_experiment(tiny_root, out / "b", attack=BadNets(malicious_fraction=0.2), defense=Median(), train=train,
                        seed=1, federation=FederationConfig(num_clients=5, rounds=3, final_rounds=1)),
    ]


def test_runs_trained_together_equal_the_same_runs_alone(tiny_root, tmp_path):
    alone = [FederatedRun(exp) for exp in two_cells(tiny_root, tmp_path / "alone")]
    alone_summaries = [run.run() for run in alone]
    together = [FederatedRun(exp) for exp in two_cells(tiny_root, tmp_path / "together")]
    cohort_sizes = []
    for name, run in zip("ab", together):
        def counting(jobs, name=name, train=run.cohort_trainer.train):
            cohort_sizes.append((name, len(jobs)))
            return train(jobs)

        run.cohort_trainer.train = counting
    summaries = run_together(together)
    assert cohort_sizes == [("a", 10), ("a", 10), ("b", 5)], "both runs' clients in one cohort; b's last round alone"
    for run, reference, summary, reference_summary in zip(together, alone, summaries, alone_summaries):
        gap = float((run.global_params - reference.global_params).abs().max() / reference.global_params.abs().max())
        assert gap < 1e-5, (run.exp.run_name, gap)
        assert len(run.records) == len(reference.records) == reference.exp.federation.rounds
        for mine, theirs in zip(run.records, reference.records):
            assert mine["local_steps"] == theirs["local_steps"] and mine["clients"] == theirs["clients"]
            assert mine["clean_acc"] == pytest.approx(theirs["clean_acc"], abs=0.1)
            assert mine["asr"] == pytest.approx(theirs["asr"], abs=0.1)
            assert mine["weights"] == pytest.approx(theirs["weights"], rel=1e-3, abs=1e-6)
        assert (run.exp.run_dir / "summary.json").exists() and summary["final"]["A"] == pytest.approx(
            reference_summary["final"]["A"], abs=0.1)


def test_runs_that_cannot_share_a_cohort_are_refused_naming_what_differs(tiny_root, tmp_path):
    first, second = two_cells(tiny_root, tmp_path)
    second = dataclasses.replace(second, train=dataclasses.replace(TRAIN, lr=0.1))
    with pytest.raises(FedbenchError, match="must share train"):
        run_together([FederatedRun(first), FederatedRun(second)])
    sequential = dataclasses.replace(TRAIN, cohort=False)
    with pytest.raises(FedbenchError, match="train.cohort=true"):
        run_together([FederatedRun(exp) for exp in two_cells(tiny_root, tmp_path / "s", train=sequential)])
    assert not list(tmp_path.rglob("metrics.jsonl")), "refused before any round"
