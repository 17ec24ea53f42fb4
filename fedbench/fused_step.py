"""A compiled cohort's whole training step as one function, for one compiled graph a step.

The autograd step of a compiled cohort (:meth:`fedbench.cohort.CohortTrainer.step`)
compiles the vmapped forward and backward pass, but around them every step still pays
eager work: seeding the backward pass, accumulating each stack's gradient, masking and
summing the losses, and the optimizer's foreach updates (on a CPU ~25 launches a step of
the papers' CNN, counted; on a GPU with ``reduce-overhead`` the compiled part replays as a
CUDA graph, the rest does not). :class:`FusedStep` writes the step as one function of
tensors instead, so ``torch.compile`` captures all of it:

    loss_k   = CE(f(W[k]; x_k), y_k) + weight_k * sum_i (W_i[k] - A_i[k])^2 * S_i[k]
               (0 for a row that is not live: ``where``, so a rider's NaN stays out)
    g_k      = d loss_k / d W[k]            (``torch.func.grad_and_value`` under ``vmap``; with
                                            ``autograd``, autograd of sum_k loss_k: the same)
    g_k     += weight_decay * W[k]
    m_k      = momentum * m_k + g_k         (m_k starts at 0: SGD's first step, m = g)
    W[k]    -= lr * m_k                     (in place, every row)

which is ``torch.optim.SGD``'s update (no dampening, no Nesterov) on each client's own
gradient, the same arithmetic as the autograd step. Rows without a pull term get weight 0
and zero anchors and scales: their term and its gradient are exactly 0. BatchNorm's
running statistics update the buffer stacks in place, as in the autograd step.

Where the autograd step stays: loss terms that are not a
:class:`~defenses.base.QuadraticPull` on the model's trainable parameters (closures
computed on each client's own model), and models with a trainable parameter the loss
does not use (``grad`` gives it a zero gradient, which weight decay and momentum would
move; torch's SGD skips a parameter without a gradient).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor
from torch.func import grad_and_value, vmap

from defenses.base import QuadraticPull

Tensors = dict[str, Tensor]
Pull = tuple[Tensors, Tensors, Tensor]  # every row's anchors, scales and weight
RowLoss = Callable[[Tensors, Tensors, Tensor, Tensor], Tensor]  # (params, buffers, inputs, labels) -> loss


class FusedState(NamedTuple):
    """What a fused step reads and updates, as ``[K, ...]`` stacks over the cohort's rows:
    trainable parameters, momenta and BatchNorm buffers (updated in place), frozen
    parameters, every row's pull term (None: no row has one) and loss totals ``[K]``."""

    trainable: Tensors
    frozen: Tensors
    buffers: Tensors
    momenta: Tensors
    pull: Pull | None
    totals: Tensor


class FusedStep:
    """``step(state, inputs, labels, live, rows)`` trains the cohort's ``rows`` one step."""

    def __init__(self, loss_of: RowLoss, lr: float, momentum: float, weight_decay: float,
                 autograd: bool = False) -> None:
        self.loss_of = loss_of
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.autograd = autograd

    def row_loss(self, trainable: Tensors, frozen: Tensors, buffers: Tensors, inputs: Tensor, labels: Tensor,
                 live: Tensor, pull: Pull | None) -> Tensor:
        """One client's loss (vmapped over the rows; differentiated in ``trainable``)."""
        loss = self.loss_of({**trainable, **frozen}, buffers, inputs, labels)
        if pull is not None:
            anchor, scale, weight = pull  # the row's own term, with the term's own arithmetic
            loss = loss + QuadraticPull([trainable[n] for n in anchor], list(anchor.values()), list(scale.values()),
                                        weight)()
        return torch.where(live, loss, torch.zeros_like(loss))

    def __call__(self, state: FusedState, inputs: Tensor, labels: Tensor, live: Tensor,
                 rows: Tensor | None = None) -> None:
        """One step of the ``rows`` (an index into the stacks' K rows; None: all of them, in
        place), whose batches are ``inputs`` ``[R, B, ...]`` and ``labels`` ``[R, B]`` in the
        order of ``rows``: the state's parameters, momenta and buffers are updated in place
        (a subset of rows is gathered, stepped and written back), and each row's loss, 0
        where the ``[K]`` bool mask ``live`` is False, added to its total (in the totals'
        dtype)."""
        trainable, frozen, buffers, momenta, pull, totals = state
        if rows is None:
            self.update(trainable, frozen, buffers, momenta, pull, totals, inputs, labels, live)
            return
        mine = [{name: t[rows] for name, t in tensors.items()} for tensors in (trainable, frozen, buffers, momenta)]
        pulled = None if pull is None else ({n: a[rows] for n, a in pull[0].items()},
                                            {n: s[rows] for n, s in pull[1].items()}, pull[2][rows])
        losses = totals.new_zeros(rows.shape[0])
        self.update(*mine, pulled, losses, inputs, labels, live[rows])
        with torch.no_grad():
            for whole, part in ((trainable, mine[0]), (buffers, mine[2]), (momenta, mine[3])):
                for name, t in part.items():
                    whole[name].index_copy_(0, rows, t)
            totals.index_add_(0, rows, losses)

    def update(self, trainable: Tensors, frozen: Tensors, buffers: Tensors, momenta: Tensors, pull: Pull | None,
               totals: Tensor, inputs: Tensor, labels: Tensor, live: Tensor) -> None:
        """The step of every row of these stacks, in place."""
        rows = (0, 0, 0, 0, 0, 0, None if pull is None else 0)
        args = (frozen, buffers, inputs, labels, live, pull)
        if self.autograd:
            grads, losses = self.rows_by_autograd(rows, trainable, *args)
        else:
            grads, losses = vmap(grad_and_value(self.row_loss), in_dims=rows)(trainable, *args)
        with torch.no_grad():
            for name, weights in trainable.items():
                step = grads[name]
                if self.weight_decay:
                    step = torch.add(step, weights, alpha=self.weight_decay)
                if self.momentum:
                    step = momenta[name].mul(self.momentum).add_(step)
                    momenta[name].copy_(step)
                weights.add_(step, alpha=-self.lr)
            totals.add_(losses.to(totals.dtype))

    def rows_by_autograd(self, rows: tuple, trainable: Tensors, *args) -> tuple[Tensors, Tensor]:
        """Every row's gradient and loss as ``vmap(grad_and_value(row_loss))`` gives them, by
        torch's autograd instead: the gradient of the rows' summed losses in the stacks, row
        k's part of which is row k's own (rows share nothing). For models whose operators
        torch.func cannot differentiate (``train.cohort_convolution=triton``); compiled, it
        needs :func:`~fedbench.compiling.traces_autograd`."""
        with torch.enable_grad():
            leaves = {name: t.detach().requires_grad_() for name, t in trainable.items()}
            losses = vmap(self.row_loss, in_dims=rows)(leaves, *args)
            grads = torch.autograd.grad(losses.sum(), list(leaves.values()))
        return dict(zip(leaves, grads)), losses.detach()


def uses_every_parameter(params: Tensors, buffers: Tensors, inputs: Tensor, labels: Tensor, loss_of: RowLoss) -> bool:
    """Whether row 0's loss on two of its samples (BatchNorm needs more than one) reaches
    every parameter in ``params`` (row 0 of each stack, copied: nothing is written)."""
    row = {name: p[0].detach().clone().requires_grad_() for name, p in params.items()}
    loss = loss_of(row, {name: b[0].clone() for name, b in buffers.items()}, inputs[0, :2], labels[0, :2])
    grads = torch.autograd.grad(loss, list(row.values()), allow_unused=True)
    return all(g is not None for g in grads)
