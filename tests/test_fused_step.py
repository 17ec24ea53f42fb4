"""The fused cohort step (one function: every row's loss, gradient and SGD update) against
an explicit loop of one model and one ``torch.optim.SGD`` per client."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from fedbench.fused_step import FusedState, FusedStep, uses_every_parameter

LR, MOMENTUM, DECAY, WEIGHT = 0.05, 0.9, 0.01, 0.3


def small_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4))


def loss_of(template: nn.Module):
    def loss(params, buffers, inputs, labels):
        return F.cross_entropy(functional_call(template, {**params, **buffers}, (inputs,)), labels)
    return loss


# each row's gradient by torch.func (the default) or by autograd of the rows' summed losses
# (train.cohort_convolution=triton, whose operator torch.func cannot differentiate)
BY_AUTOGRAD = pytest.mark.parametrize("autograd", [False, True], ids=["torch.func", "autograd"])


@BY_AUTOGRAD
def test_the_fused_step_equals_each_client_trained_alone_with_torch_sgd(autograd):
    """Three clients, three steps, float64: client 0 with a pull term, client 1 without,
    client 2 not live (its loss masked out: it moves by weight decay and momentum only, as
    torch's SGD moves a parameter whose gradient is zero) and, for each client, the
    BatchNorm statistics its own forward pass leaves."""
    torch.manual_seed(0)
    models = [small_net().double() for _ in range(3)]
    template = copy.deepcopy(models[0])
    inputs = torch.randn(3, 3, 5, 1, 6, 6, dtype=torch.float64)  # [steps, clients, batch, C, H, W]
    labels = torch.randint(0, 4, (3, 3, 5))
    live = torch.tensor([True, True, False])
    anchor = [torch.randn_like(p) for p in models[0].parameters()]
    scale = [torch.rand_like(p) for p in models[0].parameters()]

    alone = [copy.deepcopy(m) for m in models]
    optimizers = [torch.optim.SGD(m.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=DECAY) for m in alone]
    expected_totals = torch.zeros(3, dtype=torch.float64)
    for t in range(3):
        for k, (model, optimizer) in enumerate(zip(alone, optimizers)):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(inputs[t, k]), labels[t, k])
            if k == 0:
                loss = loss + WEIGHT * sum(((p - a) ** 2 * s).sum() for p, a, s in zip(model.parameters(), anchor, scale))
            if live[k]:
                loss.backward()
                expected_totals[k] += loss.item()
            else:
                for p in model.parameters():
                    p.grad = torch.zeros_like(p)
            optimizer.step()

    names = [name for name, _ in models[0].named_parameters()]
    trainable = {n: torch.stack([dict(m.named_parameters())[n].detach() for m in models]) for n in names}
    buffers = {n: torch.stack([dict(m.named_buffers())[n] for m in models]) for n, _ in models[0].named_buffers()}
    momenta = {n: torch.zeros_like(s) for n, s in trainable.items()}
    pull = ({n: torch.stack([a, torch.zeros_like(a), torch.zeros_like(a)]) for n, a in zip(names, anchor)},
            {n: torch.stack([s, torch.zeros_like(s), torch.zeros_like(s)]) for n, s in zip(names, scale)},
            torch.tensor([WEIGHT, 0.0, 0.0], dtype=torch.float64))
    totals = torch.zeros(3, dtype=torch.float64)
    step = FusedStep(loss_of(template), LR, MOMENTUM, DECAY, autograd=autograd)
    for t in range(3):
        step(FusedState(trainable, {}, buffers, momenta, pull, totals), inputs[t], labels[t], live)

    for k, (model, optimizer) in enumerate(zip(alone, optimizers)):
        for name, p in model.named_parameters():
            torch.testing.assert_close(trainable[name][k], p.detach(), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(momenta[name][k], optimizer.state[p]["momentum_buffer"], rtol=1e-12, atol=1e-12)
        for name, b in model.named_buffers():
            torch.testing.assert_close(buffers[name][k], b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(totals, expected_totals, rtol=1e-12, atol=1e-12)
    assert totals[2] == 0


@BY_AUTOGRAD
def test_a_nan_loss_of_a_row_that_is_not_live_stays_out_of_the_totals_and_the_other_rows(autograd):
    """Rows are independent: row 0 moves as it would alone, whatever row 1 computes (the
    cohort puts a rider's own row back when the round ends)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    template = copy.deepcopy(model)
    trainable = {n: torch.stack([p.detach()] * 2) for n, p in model.named_parameters()}
    inputs = torch.randn(2, 4, 3, dtype=torch.float64)
    inputs[1, 0, 0] = float("nan")
    labels = torch.zeros(2, 4, dtype=torch.long)
    totals = torch.zeros(2, dtype=torch.float64)
    FusedStep(loss_of(template), LR, 0.0, 0.0, autograd=autograd)(FusedState(trainable, {}, {}, {}, None, totals),
                                                                  inputs, labels, torch.tensor([True, False]))
    loss = F.cross_entropy(model(inputs[0]), labels[0])
    loss.backward()
    assert totals.tolist() == [pytest.approx(loss.item(), rel=1e-12), 0.0]
    for name, p in model.named_parameters():
        torch.testing.assert_close(trainable[name][0], (p - LR * p.grad).detach(), rtol=1e-12, atol=1e-12)


class HalfUsed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used, self.unused = nn.Linear(3, 2), nn.Linear(3, 2)

    def forward(self, x):
        return self.used(x)


@pytest.mark.parametrize("net, expected", [(lambda: nn.Linear(3, 2), True), (HalfUsed, False)])
def test_uses_every_parameter_finds_a_parameter_the_loss_never_reaches(net, expected):
    model = net()
    params = {n: p.detach().unsqueeze(0) for n, p in model.named_parameters()}
    found = uses_every_parameter(params, {}, torch.randn(1, 4, 3), torch.zeros(1, 4, dtype=torch.long), loss_of(model))
    assert found is expected


@BY_AUTOGRAD
def test_a_subset_of_rows_steps_like_those_clients_alone_and_leaves_the_others_as_they_are(autograd):
    """rows [2, 0] of 3 (a compiled cohort's bucket): clients 2 and 0 take one SGD step as
    alone, in the order their batches come; row 1's parameters, momenta, BatchNorm
    statistics and loss total are not touched (bit for bit)."""
    torch.manual_seed(1)
    models = [small_net().double() for _ in range(3)]
    template = copy.deepcopy(models[0])
    inputs = torch.randn(2, 5, 1, 6, 6, dtype=torch.float64)  # the batches of clients 2 and 0
    labels = torch.randint(0, 4, (2, 5))
    names = [name for name, _ in models[0].named_parameters()]
    trainable = {n: torch.stack([dict(m.named_parameters())[n].detach() for m in models]) for n in names}
    buffers = {n: torch.stack([dict(m.named_buffers())[n] for m in models]) for n, _ in models[0].named_buffers()}
    momenta = {n: torch.rand_like(s) for n, s in trainable.items()}
    totals = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    before = [{n: t[1].clone() for n, t in d.items()} for d in (trainable, buffers, momenta)]

    expected = {}
    for row, k in enumerate([2, 0]):
        model = copy.deepcopy(models[k])
        optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=DECAY)
        for name, p in model.named_parameters():
            optimizer.state[p]["momentum_buffer"] = momenta[name][k].clone()
        loss = F.cross_entropy(model(inputs[row]), labels[row])
        loss.backward()
        optimizer.step()
        expected[k] = (model, optimizer, loss.item())

    FusedStep(loss_of(template), LR, MOMENTUM, DECAY, autograd=autograd)(
        FusedState(trainable, {}, buffers, momenta, None, totals), inputs, labels, torch.ones(3, dtype=torch.bool),
        torch.tensor([2, 0]))
    for k, (model, optimizer, loss) in expected.items():
        for name, p in model.named_parameters():
            torch.testing.assert_close(trainable[name][k], p.detach(), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(momenta[name][k], optimizer.state[p]["momentum_buffer"], rtol=1e-12, atol=1e-12)
        for name, b in model.named_buffers():
            torch.testing.assert_close(buffers[name][k], b, rtol=1e-12, atol=1e-12)
    assert totals.tolist() == [pytest.approx(1.0 + expected[0][2], rel=1e-12), 2.0,
                               pytest.approx(3.0 + expected[2][2], rel=1e-12)]
    for kept, tensors in zip(before, (trainable, buffers, momenta)):
        assert all(torch.equal(kept[n], tensors[n][1]) for n in kept)
