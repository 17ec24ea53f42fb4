"""Defenses inside the round loop: each runs with attackers; verdicts reach the metrics."""

import pytest
import torch

from attacks.badnets import BadNets
from attacks.pixel_pattern import PixelPattern
from conftest import tiny_experiment
from defenses import DEFENSES
from defenses.fltrust import FLTrust
from defenses.multi_krum import MultiKrum
from fedbench.engine import FederatedRun, FederationConfig

BASELINES = ["fedavg", "norm_clipping", "krum", "multi_krum", "trimmed_mean", "median", "fltrust"]


@pytest.mark.parametrize("name", BASELINES)
def test_every_defense_completes_rounds_with_attackers(tiny_root, tmp_path, name):
    exp = tiny_experiment(tiny_root, tmp_path, attack=PixelPattern(malicious_fraction=0.2),
                          defense=DEFENSES.get(name)(),
                          federation=FederationConfig(num_clients=5, rounds=2, final_rounds=1))
    summary = FederatedRun(exp).run()
    assert summary["final"]["ASR"] is not None and summary["detection"]["rounds"] == 2
    assert torch.isfinite(torch.tensor(summary["final"]["A"]))


def test_fltrust_trains_a_real_server_update_on_a_root_set_from_the_server_split(tiny_root, tmp_path):
    exp = tiny_experiment(tiny_root, tmp_path, defense=FLTrust(root_size=20),
                          federation=FederationConfig(num_clients=4, rounds=1, final_rounds=1))
    run = FederatedRun(exp)
    root = exp.defense.root_set
    server_rows = {tuple(img.flatten().tolist()) for img in run.data.server.images}
    assert len(root) == 20 and all(tuple(img.flatten().tolist()) in server_rows for img in root.images)
    record = run.run_round(0)
    assert record["defense"]["server_norm"] > 0
    assert record["defense"]["server_steps"] == int(torch.tensor(record["local_steps"]).median())


def test_excluded_clients_show_up_in_the_detection_metrics(tiny_root, tmp_path):
    # One attacker (client 4) boosts its update 50x: Multi-Krum (f = 1, m = 4) must drop it.
    exp = tiny_experiment(tiny_root, tmp_path, attack=BadNets(malicious_fraction=0.2, scale=50.0),
                          defense=MultiKrum(), federation=FederationConfig(num_clients=5, rounds=1, final_rounds=1))
    record = FederatedRun(exp).run_round(0)
    assert record["attacking"] == [False, False, False, False, True]
    assert record["excluded"] == [False, False, False, False, True]
    assert record["detection"]["tpr"] == 1.0 and record["detection"]["fpr"] == 0.0
    assert record["detection"]["precision"] == 1.0 and record["detection"]["malicious_weight"] == 0.0
