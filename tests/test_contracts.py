"""What every registered defense and attack promises, checked for each one found in the
registries: a new one is covered here without editing a list. The hand-worked tests of
each rule live in test_defenses.py and test_attacks.py."""

from __future__ import annotations

import pytest
import torch

from attacks import ATTACKS
from attacks.base import AttackSetup, BackdoorAttack, ClientInfo, ServerView
from defenses import DEFENSES
from defenses.base import DefenseSetup, RoundContext
from fedbench.data import ImagePipeline, ImageSet
from fedbench.params import ParameterLayout

MEAN, STD = (0.2860,), (0.3530,)


def tiny_layout() -> ParameterLayout:
    torch.manual_seed(0)
    return ParameterLayout(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)))  # d = 15


def defense_env(n: int, layout: ParameterLayout) -> DefenseSetup:
    """n clients per round, f = n // 5 expected attackers, a small server split and a
    server trainer that returns a fixed update (what FLTrust asks of the engine)."""
    server = ImageSet(torch.randint(0, 256, (200, 1, 2, 2), dtype=torch.uint8), torch.randint(0, 3, (200,)))
    fixed = torch.linspace(-1.0, 1.0, layout.dim)
    return DefenseSetup(num_clients=n, clients_per_round=n, expected_malicious=n // 5, layout=layout,
                        server_data=server, server_train=lambda params, data, steps, round_index: fixed.clone())


def round_context(n: int, dim: int, defense) -> RoundContext:
    hook = defense.client_hook()
    keys = hook.upload_keys if hook is not None else ()
    uploads = {key: torch.rand((n, *hook.upload_shape(key, dim)), generator=torch.Generator().manual_seed(7),
                               dtype=torch.float64) for key in keys}
    return RoundContext(round=3, client_ids=torch.arange(n), global_params=torch.zeros(dim),
                        local_steps=torch.full((n,), 5), uploads=uploads,
                        generator=torch.Generator().manual_seed(11))


@pytest.mark.parametrize("name", DEFENSES.names())
def test_every_defense_keeps_the_aggregation_contract(name):
    layout = tiny_layout()
    allowed = 0
    for n in range(1, 21):
        defense = DEFENSES.get(name)()
        env = defense_env(n, layout)
        if defense.problems(env):
            continue  # the rule does not allow n with this f (e.g. Krum needs n > 2f + 2)
        allowed += 1
        defense.setup(env)
        updates = torch.randn(n, layout.dim, generator=torch.Generator().manual_seed(n))
        counts = torch.arange(1, n + 1) * 10
        out = defense.aggregate(updates.clone(), counts, round_context(n, layout.dim, defense))
        again = DEFENSES.get(name)()
        again.setup(env)
        repeat = again.aggregate(updates.clone(), counts, round_context(n, layout.dim, again))
        assert out.update.shape == (layout.dim,) and torch.isfinite(out.update).all(), (name, n)
        assert out.weights.shape == (n,) and (out.weights >= 0).all(), (name, n)
        total = float(out.weights.double().sum())
        assert total == pytest.approx(1.0, abs=1e-5) or total == pytest.approx(0.0, abs=1e-12), (name, n, total)
        assert out.excluded.dtype == torch.bool and out.excluded.shape == (n,), (name, n)
        assert torch.equal(out.update, repeat.update) and torch.equal(out.weights, repeat.weights), \
            f"{name} is not deterministic for a given generator (n = {n})"
    assert allowed >= 1, f"{name} allowed no n in 1..20"


@pytest.mark.parametrize("name", DEFENSES.names())
def test_every_defense_plans_the_server_training_it_asks_for(name):
    # What server_training_plan foresees from the clients' steps is the one server_train call
    # aggregate then makes (None: no call), from this round's global parameters, so a cohort
    # can train it beforehand as one more row (FederatedRun.server_job).
    layout, n = tiny_layout(), 10
    defense = DEFENSES.get(name)()
    env = defense_env(n, layout)
    calls = []
    fixed = env.server_train
    env.server_train = lambda *args: calls.append(args) or fixed(*args)
    defense.setup(env)
    ctx = round_context(n, layout.dim, defense)
    ctx.local_steps = torch.tensor([3, 9, 4, 12, 7, 5, 8, 6, 11, 10])
    plan = defense.server_training_plan(ctx.local_steps.clone())
    defense.aggregate(torch.randn(n, layout.dim, generator=torch.Generator().manual_seed(1)),
                      torch.arange(1, n + 1) * 10, ctx)
    if plan is None:
        assert calls == [], f"{name} asks for server training it did not plan (a cohort would train it alone, after)"
        return
    ((params, data, steps, round_index),) = calls
    assert params is ctx.global_params and round_index == ctx.round
    assert data is plan.data and steps == plan.steps, name


def ready_attack(name: str, channels: int = 1, size: int = 28):
    pipeline = ImagePipeline(MEAN, STD, channels=channels, augment=False, hflip=False, crop_padding=0)
    attack = ATTACKS.get(name)()
    attack.setup(AttackSetup(10, 10, channels, size, pipeline, torch.device("cpu"), seed=0))
    return attack, pipeline


def attackers(attack) -> list[ClientInfo]:
    return [ClientInfo(c, 0, malicious=True, attacking=True, attacker_rank=i)
            for i, c in enumerate(attack.malicious_clients(10, seed=0))]


BACKDOORS = [name for name in ATTACKS.names() if issubclass(ATTACKS.get(name), BackdoorAttack)]
WITH_ATTACKERS = [name for name in ATTACKS.names() if ATTACKS.get(name)().num_malicious(10) > 0]


def test_the_contract_lists_come_from_the_registry():
    assert {"pixel_pattern", "dba"} <= set(BACKDOORS) and "none" not in WITH_ATTACKERS


@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
@pytest.mark.parametrize("name", BACKDOORS)
def test_every_trigger_stays_in_the_valid_input_range(name, channels, size):
    attack, pipeline = ready_attack(name, channels, size)
    raw = torch.rand(8, channels, size, size, generator=torch.Generator().manual_seed(0))
    raw[0], raw[1] = 0.0, 1.0  # the range's ends
    inputs = pipeline.normalize(raw)
    for parts in [None, *(attack.parts_of(c) for c in attackers(attack))]:
        pixels = attack.apply_trigger(inputs, parts) * pipeline.std + pipeline.mean  # back to [0, 1] by hand
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5, (name, parts)


@pytest.mark.parametrize("name", ATTACKS.names())
def test_every_attack_crafts_rows_of_the_updates_shape(name):
    attack, _ = ready_attack(name)
    update = torch.randn(15, generator=torch.Generator().manual_seed(1))
    for client in attackers(attack):
        crafted = attack.craft_update(update.clone(), client)
        assert crafted.shape == (15,), name


@pytest.mark.parametrize("name", WITH_ATTACKERS)
def test_every_server_side_attack_leaves_the_round_as_it_found_it(name):
    attack, _ = ready_attack(name)
    n, dim = 10, 15
    own = torch.zeros(n, dtype=torch.bool)
    own[[c.client_id for c in attackers(attack)]] = True
    updates = torch.randn(n, dim, generator=torch.Generator().manual_seed(2))
    before = updates.clone()
    view = ServerView(round=0, updates=updates, own=own, client_ids=torch.arange(n),
                      num_samples=torch.full((n,), 100), global_params=torch.zeros(dim),
                      expected_malicious=int(own.sum()), generator=torch.Generator().manual_seed(3))
    rows = attack.craft_round(view)
    assert torch.equal(updates, before), f"{name} changed the round's rows in place"
    if rows is not None:
        assert rows.shape == (int(own.sum()), dim), f"{name}: one row per attacking client"
