"""SDFC's client-side state: Fisher computation leaves BatchNorm buffers alone, and a client
returning after sitting out rounds (client sampling) re-anchors to the current global model."""

import pytest
import torch
import torch.nn as nn

from attacks.base import ClientInfo
from conftest import tiny_experiment
from defenses.sdfc import SDFC
from fedbench.client import LocalTrainConfig
from fedbench.engine import FederatedRun
from fedbench.experiment import FederationConfig
from fedbench.fisher import diagonal_fisher, published_fisher
from fedbench.models import MODELS


class TinyBNNet(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, image_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


if "test_tiny_bn" not in MODELS:
    MODELS.register("test_tiny_bn")(lambda num_classes, in_channels, image_size: TinyBNNet(num_classes, in_channels,
                                                                                          image_size))


def shifted_batches(n: int = 3):
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 1, 6, 6, generator=generator) * 3 + 5, torch.randint(0, 3, (8,), generator=generator))
            for _ in range(n)]


@pytest.mark.parametrize("estimator", ["published", "empirical"])
def test_fisher_leaves_batchnorm_buffers_exactly_as_they_were(estimator):
    model = TinyBNNet(3, 1, 6).train()
    before = {name: b.clone() for name, b in model.named_buffers()}
    diagonal_fisher(model, shifted_batches(), estimator)
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, before[name]), name
    assert model.training, "the model's mode is left as it was"


def test_the_published_estimator_itself_moves_batchnorm_statistics():
    # Why the restore matters: a train-mode forward pass updates the running mean.
    model = TinyBNNet(3, 1, 6).train()
    published_fisher(model, shifted_batches())
    assert float(model.bn.running_mean.abs().max()) > 0.1


def test_uploaded_buffers_are_identical_with_and_without_the_sdfc_hook(tiny_root, tmp_path):
    uploads = []
    for with_hook in (True, False):
        exp = tiny_experiment(tiny_root, tmp_path / str(with_hook), defense=SDFC(mode="weights_only"),
                              federation=FederationConfig(num_clients=4, rounds=1, final_rounds=1))
        exp.model.name = "test_tiny_bn"
        run = FederatedRun(exp)
        if not with_hook:
            run.hook = None
        uploads.append(run.train_client(run.client_info(1, 0)).buffers)
    with_hook, without = uploads
    assert with_hook.numel() > 0 and torch.equal(with_hook, without)


def linear_and_batches():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    generator = torch.Generator().manual_seed(1)
    local = [(torch.randn(4, 3, generator=generator), torch.tensor([0, 1, 1, 0]))]
    server = [(torch.randn(4, 3, generator=generator), torch.tensor([1, 1, 0, 1]))]
    return model, (lambda clean=False: iter(local)), (lambda: iter(server)), local, server


def published_reference(model: nn.Module, batches) -> list[torch.Tensor]:
    """(mean over batches of d/dtheta [mean over all (i, j) of log p(y_j | x_i)])^2, by explicit loops."""
    params = list(model.parameters())
    totals = [torch.zeros_like(p) for p in params]
    for x, y in batches:
        log_probs = torch.log_softmax(model(x), dim=1)
        pairs = [log_probs[i, y[j]] for i in range(len(x)) for j in range(len(y))]
        grads = torch.autograd.grad(torch.stack(pairs).mean(), params)
        for total, g in zip(totals, grads):
            total += g / len(batches)
    return [t.pow(2) for t in totals]


def test_a_client_returning_after_missed_rounds_reanchors_to_the_current_global_model():
    model, local_batches, server_batches, local, server = linear_and_batches()
    hook = SDFC(estimator="published").client_hook()
    old_delta, old_previous = [torch.ones(2, 3), torch.ones(2)], [torch.zeros(2, 3), torch.zeros(2)]
    hook.delta[0], hook.previous[0], hook.stored_round[0] = old_delta, old_previous, 2
    # Round 5, last seen in round 2: stale, so Delta and the anchor come from the current model.
    hook.before_training(ClientInfo(0, 5), model, local_batches, server_batches)
    expected = [(a - b).abs() for a, b in zip(published_reference(model, local), published_reference(model, server))]
    for got, want in zip(hook.delta[0], expected):
        assert torch.allclose(got, want, atol=1e-7)
    for got, param in zip(hook.previous[0], model.parameters()):
        assert torch.equal(got, param.detach())
    assert hook.stored_round[0] == 5


def test_a_client_seen_in_the_previous_round_keeps_its_own_anchor():
    model, local_batches, server_batches, _, _ = linear_and_batches()
    hook = SDFC(estimator="published").client_hook()
    old_delta, old_previous = [torch.ones(2, 3), torch.ones(2)], [torch.zeros(2, 3), torch.zeros(2)]
    hook.delta[0], hook.previous[0], hook.stored_round[0] = old_delta, old_previous, 4
    term = hook.before_training(ClientInfo(0, 5), model, local_batches, server_batches)
    assert hook.delta[0] is old_delta and hook.previous[0] is old_previous
    # lambda * sum Delta (theta - theta_prev)^2 with Delta = 1 and theta_prev = 0: the squared norm.
    expected = sum(float(p.detach().pow(2).sum()) for p in model.parameters())
    assert float(term().detach()) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("cohort", [False, True])
def test_under_client_sampling_a_returning_client_reanchors_inside_the_engine(tiny_root, tmp_path, cohort):
    exp = tiny_experiment(tiny_root, tmp_path, defense=SDFC(),
                          train=LocalTrainConfig(local_steps=4, batch_size=32, cohort=cohort),
                          federation=FederationConfig(num_clients=5, rounds=5, final_rounds=1, client_fraction=0.4))
    run = FederatedRun(exp)
    hook, original = run.hook, run.hook.before_training_together
    seen: dict[int, int] = {}
    checked, handed = {"stale": 0, "fresh": 0}, []

    def spy(calls):
        handed.append(len(calls))
        before = {call.client.client_id: hook.previous.get(call.client.client_id) for call in calls}
        terms = original(calls)
        for client in (call.client for call in calls):
            anchor = torch.cat([p.reshape(-1) for p in hook.previous[client.client_id]])
            if seen.get(client.client_id, -2) < client.round - 1:  # absent from the previous round
                assert torch.equal(anchor, run.global_params), "a returning client anchors to the current global model"
                checked["stale"] += 1
            else:
                assert hook.previous[client.client_id] is before[client.client_id], "a client seen last round keeps its own anchor"
                checked["fresh"] += 1
            seen[client.client_id] = client.round
        return terms

    hook.before_training_together = spy
    run.run()
    assert checked["stale"] > 0 and checked["fresh"] > 0, checked
    assert set(handed) == ({2} if cohort else {1}), "a cohort's two clients go to the hook together"
    assert hook.stored_round == seen
