"""The engine's attack hooks, driven through real rounds: a server-side attack that sees
the whole round and replaces only its own rows, and client-side hooks (an extra loss
term, a per-step projection, after-training) on the attacking clients only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attacks.base import Attack
from conftest import tiny_experiment
from fedbench.engine import FederatedRun
from fedbench.experiment import FederationConfig


class NegatedBenignMean(Attack):
    """Test attack (not registered): every attacker sends minus the benign clients' mean."""

    def __init__(self, **kwargs) -> None:
        super().__init__(malicious_fraction=0.4, **kwargs)
        self.seen: list[torch.Tensor] = []

    def craft_round(self, view):
        self.seen.append(view.updates.clone())
        return (-view.benign.mean(dim=0)).expand(int(view.own.sum()), -1)


class ProjectedAttacker(Attack):
    """Test attack: keeps its model within an L2 ball of ``radius`` around the global model
    after every step, and counts its loss-term and after-training calls."""

    def __init__(self, radius: float = 0.01, **kwargs) -> None:
        super().__init__(malicious_fraction=0.4, **kwargs)
        self.radius = radius
        self.loss_calls: dict[int, int] = {}
        self.after_calls: list[int] = []

    def before_training(self, client, model):
        self.loss_calls[client.client_id] = 0

        def term():
            self.loss_calls[client.client_id] += 1
            return torch.zeros(())

        return term

    def step_hook(self, client, model):
        start = [p.detach().clone() for p in model.parameters()]

        def project():
            with torch.no_grad():
                delta = torch.cat([(p - s).reshape(-1) for p, s in zip(model.parameters(), start)])
                scale = min(1.0, self.radius / float(delta.norm()))
                for p, s in zip(model.parameters(), start):
                    p.copy_(s + (p - s) * scale)

        return project

    def after_training(self, client, model):
        self.after_calls.append(client.client_id)


def test_a_server_side_attack_replaces_only_its_own_rows(tiny_root, tmp_path):
    attack = NegatedBenignMean()
    exp = tiny_experiment(tiny_root, tmp_path, attack=attack, federation=FederationConfig(num_clients=5, rounds=1,
                                                                                          final_rounds=1))
    run = FederatedRun(exp)
    start = run.global_params.clone().double().numpy()
    record = run.run_round(0)
    sent = attack.seen[0].double().numpy()
    attacking = np.array(record["attacking"])
    assert attacking.tolist() == [False, False, False, True, True]
    replacement = -sent[~attacking].mean(axis=0)
    norms = np.array(record["update_norms"])
    assert np.allclose(norms[~attacking], np.linalg.norm(sent[~attacking], axis=1), rtol=1e-5), "benign rows as sent"
    assert np.allclose(norms[attacking], np.linalg.norm(replacement), rtol=1e-5)
    counts = np.array([len(s) for s in run.client_sets], dtype=np.float64)
    rows = np.where(attacking[:, None], replacement[None, :], sent)
    expected = start + (counts / counts.sum()) @ rows  # FedAvg of what the server received
    assert np.allclose(run.global_params.double().numpy(), expected, atol=1e-6)


def test_client_side_hooks_run_on_attacking_clients_at_every_step(tiny_root, tmp_path):
    attack = ProjectedAttacker(radius=0.01)
    exp = tiny_experiment(tiny_root, tmp_path, attack=attack, federation=FederationConfig(num_clients=5, rounds=1,
                                                                                          final_rounds=1))
    record = FederatedRun(exp).run_round(0)
    norms = np.array(record["update_norms"])
    attacking = np.array(record["attacking"])
    assert (norms[attacking] <= 0.01 * (1 + 1e-4)).all(), "projected onto the ball after every step"
    assert (norms[~attacking] > 0.01).all(), "benign clients are not projected, so the check can fail"
    assert attack.loss_calls == {3: 4, 4: 4}, "the loss term is evaluated once per local step (4 steps)"
    assert attack.after_calls == [3, 4]


def test_hooks_wait_for_rounds_the_schedule_attacks_in(tiny_root, tmp_path):
    client_side, server_side = ProjectedAttacker(radius=0.01, every=2), NegatedBenignMean(every=2)
    for attack, name in ((client_side, "client"), (server_side, "server")):
        exp = tiny_experiment(tiny_root, tmp_path / name, attack=attack,
                              federation=FederationConfig(num_clients=5, rounds=2, final_rounds=1))
        run = FederatedRun(exp)
        records = [run.run_round(0), run.run_round(1)]
        assert [any(r["attacking"]) for r in records] == [True, False]
    assert client_side.after_calls == [3, 4], "round 1 (no attack): no client-side hook"
    assert len(server_side.seen) == 1, "round 1 (no attack): craft_round is not called"


class WrongShape(Attack):
    def __init__(self, **kwargs) -> None:
        super().__init__(malicious_fraction=0.4, **kwargs)

    def craft_round(self, view):
        return view.updates  # every row, not only its own


class Vandal(NegatedBenignMean):
    """Writes into the view's rows in place: the round must not see it."""

    def craft_round(self, view):
        view.updates.fill_(123.0)
        return super().craft_round(view)


def test_a_server_side_attack_cannot_send_the_wrong_rows_or_change_others(tiny_root, tmp_path):
    exp = tiny_experiment(tiny_root, tmp_path, attack=WrongShape(),
                          federation=FederationConfig(num_clients=5, rounds=1, final_rounds=1))
    with pytest.raises(ValueError, match=r"craft_round returned rows of shape \(5, \d+\), expected \(2, \d+\)"):
        FederatedRun(exp).run_round(0)
    exp = tiny_experiment(tiny_root, tmp_path / "vandal", attack=Vandal(),
                          federation=FederationConfig(num_clients=5, rounds=1, final_rounds=1))
    record = FederatedRun(exp).run_round(0)
    assert max(record["update_norms"][:3]) < 123.0, "benign rows as their clients sent them"


def test_an_adaptive_attacker_evades_in_rounds_it_does_not_attack_too(tiny_root, tmp_path):
    from attacks.evasion import EvadingProtocol
    from attacks.pixel_pattern import PixelPattern
    from defenses.sdfc import SDFC

    exp = tiny_experiment(tiny_root, tmp_path, attack=PixelPattern(adaptive=True, every=2), defense=SDFC(),
                          federation=FederationConfig(num_clients=5, rounds=2, final_rounds=1))
    run = FederatedRun(exp)
    resting = run.client_info(4, 1)
    assert resting.malicious and not resting.attacking
    assert isinstance(run.protocol_of(resting), EvadingProtocol)
    assert run.protocol_of(run.client_info(0, 1)) is run.hook, "benign clients run the defense's own protocol"
