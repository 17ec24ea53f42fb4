"""Several clients' local training as one cohort: one forward and backward pass per step
over every client's batch (``torch.func.functional_call`` under ``vmap``), one SGD update
over every client's parameters. The parameters and buffers are stacked once per round
(:class:`ClientStacks`) and each client's model points into its row, so no step copies.

What stays each client's own: its copy of the model (so every client hook sees a normal
module), its data order, augmentation draws and poisoning (its own seeded epochs, drawn
as in sequential training; a step gathers every client's batch from device tables in a
few operations, whatever the number of clients, runs the pipeline once over all of them
and stamps every client of one trigger together: :class:`~fedbench.cohort_feed.CohortFeed`),
its extra loss terms (those of the form
:class:`~defenses.base.QuadraticPull`, SDFC's calibration, computed for all clients in
one pass over the stacks, row by row with the term's own arithmetic) and after-step hooks,
its SGD momentum, and its number of steps: a client whose epochs (or ``local_steps``)
are done drops out of the cohort and stops moving. Clients whose batch of this step has
another shape (a client smaller than one batch) are stepped in a cohort of their own.

The numbers equal sequential training up to float rounding (vmapped kernels sum in
another order; in float64 they agree to 1e-15). On a GPU the point is fewer, larger
kernels: a round of K clients of the papers' 90k-parameter CNN on batches of 64 is
kernel-launch bound sequentially. ``channels_last`` has no effect inside the cohort (on CUDA
vmap needs contiguous tensors there). On CUDA, BatchNorm runs as plain tensor operations
(:func:`explicit_batch_norm`): cuDNN's batch norm asks its input for a memory format, which
vmap cannot answer, and refuses float32 running statistics for a bf16 input under vmap.

With ``train.compile`` (:func:`~fedbench.compiling.compiled`, one graph per batch shape the
process meets) a cohort fed by the :class:`~fedbench.cohort_feed.CohortFeed` computes K,
then ceil(K/2), then ceil(K/4) rows a step (clients done with their epochs ride along to
fill them, masked out and put back: :meth:`CohortTrainer.train_all_rows`), so a round does
not compile a graph for each cohort size it would shrink through, and a step is two
compiled graphs: the feed's batches, and the whole training step
(:class:`~fedbench.fused_step.FusedStep`). Where the
fused step cannot serve (a loss term that is not a :class:`QuadraticPull`, a trainable
parameter the loss never reaches), the vmapped forward and backward pass and the stacked
loss terms are compiled instead, and every row is computed at every step.

Limits: models with random layers (Dropout) or ``BatchNorm(momentum=None)`` cannot be
vmapped (a clear error says so); ``16-mixed`` precision is refused (one loss scaler for
all clients would skip every client's step when one overflows). Every client's
before-training hooks run before any client trains: hooks keep their state per client.
"""

from __future__ import annotations

import contextlib
from contextlib import contextmanager
from typing import Callable, Iterator, TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, vmap

from attacks.base import BatchPoisoning
from defenses.base import QuadraticPull
from fedbench import matmul_conv
from fedbench.client import ClientJob, LocalResult, LocalTrainConfig, LocalTrainer, RawBatch
from fedbench.cohort_feed import CohortFeed, DataPool, DeviceIndex, Group, row_batches
from fedbench.compiling import StableTensors, compiled, mark_static, step_begins, traces_autograd, unstable
from fedbench.data import Augmentation, ImagePipeline
from fedbench.errors import FedbenchError
from fedbench.fused_step import FusedState, FusedStep, Pull, uses_every_parameter
from fedbench.params import trainable_parameters

Batch = TypeVar("Batch")  # a client's batch, as its stream hands it out


class CohortTrainer:
    """Trains the jobs' models together with the sequential trainer's configuration."""

    def __init__(self, trainer: LocalTrainer) -> None:
        self.trainer = trainer
        self.template = trainer.model
        self.explicit_batch_norm = trainer.fabric.device.type == "cuda"
        self.compile = trainer.config.compile
        self.vmapped_losses = compiled(vmap(self.loss_of), self.compile)
        config = trainer.config
        # torch.func.grad cannot differentiate the Triton convolution's operator: its fused step
        # differentiates with autograd, which the compiler traces in torch 2.11 and later only
        by_autograd = config.cohort_convolution == "triton"
        fusable = self.compile is not None and (not by_autograd or traces_autograd())
        step = FusedStep(self.loss_of, config.lr, config.momentum, config.weight_decay, autograd=by_autograd)
        self.fused = compiled(step.__call__, self.compile, trace_autograd=by_autograd) if fusable else None
        self.every_parameter_used: bool | None = None  # found on the first fused step's batch
        self.row_batches = compiled(row_batches, self.compile)
        # under CUDA graphs, what the compiled graphs read or update keeps its address across rounds
        self.stable = StableTensors() if self.compile == "reduce-overhead" else unstable
        self.pull_terms = compiled(quadratic_terms, self.compile)
        self.pull: StackedPull | None = None  # this round's stacked loss terms, while it trains
        self.pulled_rows: list[int] = []  # the clients whose term the last round stacked
        self.own_terms: set[int] = set()  # this round's clients whose loss term stays their own closure
        self.pool: DataPool | None = None  # the clients' data as one tensor, kept while they stay the same

    def train(self, jobs: list[ClientJob]) -> list[LocalResult]:
        config = self.trainer.config
        feed = (CohortFeed.of(self.trainer, jobs, self.pool, self.row_batches, self.compile == "reduce-overhead",
                              self.stable)
                or BatchByBatch(self.trainer, jobs))
        self.pool = feed.pool if isinstance(feed, CohortFeed) else self.pool
        stacks = ClientStacks([job.model for job in jobs], self.stable)
        optimizer = StackedSGD(list(stacks.params.values()), config.lr, config.momentum, config.weight_decay,
                               self.stable)
        self.pull = StackedPull.of(jobs, stacks)
        pulled = set(self.pull.rows) if self.pull is not None else set()
        self.own_terms = {k for k, job in enumerate(jobs) if job.regularizer is not None and k not in pulled}
        self.template.train()  # functional_call runs the template's modules: their mode counts
        for job in jobs:
            job.model.train()
        if self.compile is not None and isinstance(feed, CohortFeed):
            steps, loss_sums = self.train_all_rows(jobs, feed, stacks, optimizer)
        else:
            steps, loss_sums = self.train_shrinking(jobs, feed, stacks, optimizer)
        self.pulled_rows = self.pull.rows if self.pull is not None else []
        self.pull = None  # a copy of the hooks' state (under reduce-overhead StableTensors keeps one more)
        return [LocalResult(n, float(total) / max(n, 1)) for n, total in zip(steps, loss_sums.tolist())]

    def train_shrinking(self, jobs: list[ClientJob], feed: "CohortFeed | BatchByBatch", stacks: "ClientStacks",
                        optimizer: "StackedSGD") -> tuple[list[int], Tensor]:
        """Each step trains the clients that still have a batch (gathered rows when not all
        do); returns every client's steps and loss total."""
        limits = [job.step_limit(self.trainer.config) for job in jobs]
        steps = [0] * len(jobs)
        loss_sums = torch.zeros(len(jobs), device=stacks.device)
        active = list(range(len(jobs)))
        while active:
            groups = feed.next(active)
            if not groups:
                break
            stepped, losses = self.step(jobs, groups, stacks, optimizer)
            if stepped == stacks.everyone:  # every client stepped, in client order: one add for all
                loss_sums += losses
            else:
                loss_sums.index_add_(0, stacks.index(stepped), losses.to(loss_sums.dtype))
            self.after_steps(jobs, stepped, steps)
            # in client order: groups of other shapes come back joined, and an unsorted list
            # would never again be the whole cohort (every step would gather its rows)
            active = sorted(k for k in stepped if limits[k] is None or steps[k] < limits[k])
        return steps, loss_sums

    def train_all_rows(self, jobs: list[ClientJob], feed: "CohortFeed", stacks: "ClientStacks",
                       optimizer: "StackedSGD") -> tuple[list[int], Tensor]:
        """For a compiled cohort: a step computes a fixed number of rows (:func:`bucket_rows`:
        all K, or ceil(K/2) or ceil(K/4) once that many clients are done), so graphs of at
        most three sizes (two graphs each: batches and step) serve every round (a cohort that
        shrinks client by client compiles one per size it passes through). A client whose epochs are done rides along where its row
        pads the bucket: its loss is masked out of the step (zero gradient, not counted) and
        its parameters and buffers, which weight decay, momentum and BatchNorm would still
        move, are set aside when it finishes and put back at the round's end. Each step is
        one :class:`~fedbench.fused_step.FusedStep` where it can be (else, every row)."""
        limits = [job.step_limit(self.trainer.config) for job in jobs]
        steps = [0] * len(jobs)
        loss_sums = self.stable(("loss totals",), torch.zeros(len(jobs), device=stacks.device))
        live, parked, fused = list(stacks.everyone), {}, None
        while True:
            still = [k for k in live if (limits[k] is None or steps[k] < limits[k]) and feed.has_batch(k)]
            if not still:
                break
            for k in set(live).difference(still):  # done since the last step: rows as they finished
                parked[k] = stacks.row(k)
            live = still
            rows = bucket_rows(live, len(jobs)) if fused is not None else stacks.everyone
            step_begins(self.compile)
            groups = feed.next(live, rows)
            if fused is None and self.can_fuse(stacks, groups):
                fused = self.fused_state(stacks, optimizer, loss_sums)
            if fused is not None:
                [(_, inputs, labels)] = groups
                subset = None if rows == stacks.everyone else stacks.index(rows)
                with self.model_context():
                    self.fused(fused, vmappable(inputs), labels, stacks.rows(live), subset)
            else:
                _, losses = self.step(jobs, groups, stacks, optimizer, live)
                loss_sums += losses.to(loss_sums.dtype)
            self.after_steps(jobs, live, steps)
        stacks.put_back(parked)
        return steps, loss_sums

    def can_fuse(self, stacks: "ClientStacks", groups: list["Group"]) -> bool:
        """Whether this step can be one :class:`~fedbench.fused_step.FusedStep` (compiled,
        every loss term stacked, every trainable parameter in the loss)."""
        if self.fused is None or self.own_terms:
            return False
        if self.every_parameter_used is None:
            _, inputs, labels = groups[0]
            with self.model_context():
                self.every_parameter_used = uses_every_parameter(stacks.trainable(), stacks.buffers, inputs, labels,
                                                                 self.loss_of)
        return self.every_parameter_used

    def fused_state(self, stacks: "ClientStacks", optimizer: "StackedSGD", loss_sums: Tensor) -> FusedState:
        """This round's tensors a fused step updates in place (and reads): trainable and frozen
        parameters, buffers, momenta, pull terms, loss totals. Under ``reduce-overhead`` they
        are marked static, so the CUDA graph updates them where they are."""
        trainable = stacks.trainable()
        frozen = {name: s.detach() for name, s in stacks.params.items() if name not in trainable}
        momenta = dict(zip(trainable, optimizer.momenta))
        pull = self.pull.full(self.stable) if self.pull is not None else None
        state = FusedState(trainable, frozen, stacks.buffers, momenta, pull, loss_sums)
        if self.compile == "reduce-overhead":
            mark_static(state)
        return state

    @contextmanager
    def model_context(self) -> Iterator[None]:
        """Where the stacked model runs: the precision's autocast (convolutions cast to its
        dtype by hand: :func:`~fedbench.matmul_conv.conv2d_in_autocast_dtype`), BatchNorm as
        tensor ops on CUDA, convolutions as matrix products with
        ``train.cohort_convolution=matmul`` or one Triton kernel for all clients with
        ``triton``, and one clear message for a model the cohort cannot vmap."""
        config = self.trainer.config
        device = self.trainer.fabric.device.type
        convolution = config.cohort_convolution
        # each context is entered before the next is built: the autocast test sees fabric's
        with (self.trainer.fabric.autocast(), batch_norm_as_tensor_ops(self.explicit_batch_norm),
              convolutions_as_matmul(convolution == "matmul"), convolutions_per_client(convolution == "triton"),
              convolutions_in_autocast_dtype(convolution == "grouped" and torch.is_autocast_enabled(device)),
              cohort_errors(config.cohort, self.compile)):
            yield

    @staticmethod
    def after_steps(jobs: list[ClientJob], stepped: list[int], steps: list[int]) -> None:
        for k in stepped:
            if jobs[k].after_step is not None:
                jobs[k].after_step()
            steps[k] += 1

    def step(self, jobs: list[ClientJob], groups: list["Group"], stacks: "ClientStacks",
             optimizer: "StackedSGD", live: list[int] | None = None) -> tuple[list[int], Tensor]:
        """One optimizer step of every client in ``groups`` (clients with inputs and labels of
        one shape); returns those clients and their losses, in the same order. With ``live``
        (one group of every row) only those clients' losses count: the others' are 0."""
        stacks.zero_grad()
        pulls = self.pull.terms(stacks, self.pull_terms) if self.pull is not None else None
        stepped: list[int] = []
        per_group = []
        for group, inputs, labels in groups:
            losses = self.group_losses(stacks, group, inputs, labels)
            if pulls is not None:  # clients without a pull have weight 0 there: + 0 exactly
                losses = losses + (pulls if group == stacks.everyone else pulls.index_select(0, stacks.index(group)))
            own = [k for k in group if k in self.own_terms and (live is None or k in live)]
            if own:
                zero = losses.new_zeros(())
                losses = losses + torch.stack([jobs[k].regularizer() if k in own else zero for k in group])
            if live is not None and len(live) < len(group):  # where, not a product: a rider's NaN stays out
                losses = torch.where(stacks.rows(live), losses, losses.new_zeros(()))
            stepped += group
            per_group.append(losses)
        per_client = torch.cat(per_group) if len(per_group) > 1 else per_group[0]
        self.trainer.fabric.backward(per_client.sum())
        stacks.collect_model_grads([k for k in stepped if k in self.own_terms and (live is None or k in live)])
        optimizer.step(None if len(stepped) == len(jobs) else stacks.rows(stepped))
        return stepped, per_client.detach()

    def group_losses(self, stacks: "ClientStacks", group: list[int], inputs: Tensor, labels: Tensor) -> Tensor:
        """Each client's cross-entropy on its batch, ``[K]``, in one vmapped pass; BatchNorm
        statistics land in the stacks."""
        params, buffers = stacks.select(group)
        inputs = vmappable(inputs)
        with self.model_context():
            losses = self.vmapped_losses(params, buffers, inputs, labels)
        stacks.write_back_buffers(group, buffers)
        return losses

    def loss_of(self, params: dict[str, Tensor], buffers: dict[str, Tensor], inputs: Tensor, labels: Tensor) -> Tensor:
        """One client's cross-entropy on its batch (vmapped over the cohort)."""
        return F.cross_entropy(functional_call(self.template, {**params, **buffers}, (inputs,)), labels)


class ClientStacks:
    """The cohort's parameters and buffers as ``[K, ...]`` stacks, built once per round:
    each client model's tensors are re-pointed (``.data``) at their row, so a hook that holds
    a model's parameters reads and writes the stacks, and no step copies between them.
    The stacks are the optimizer's leaves; a loss term computed on a model's own parameters
    (SDFC's calibration, an attack's term) leaves its gradient there, added to the row."""

    def __init__(self, models: list[nn.Module], stable: Callable[[tuple, Tensor], Tensor] = unstable) -> None:
        self.models = models
        self.everyone = list(range(len(models)))
        trainable = {name: p.requires_grad for name, p in models[0].named_parameters()}
        # a fresh leaf over the kept storage each round: last round's leaf keeps its .grad
        self.params = {name: stable(("parameters", name), stack.detach()).detach().requires_grad_(trainable[name])
                       for name, stack in stacked(models, lambda m: m.named_parameters()).items()}
        self.buffers = {name: stable(("buffers", name), stack)
                        for name, stack in stacked(models, lambda m: m.named_buffers()).items()}
        self.device = next(iter(self.params.values())).device
        self.index = DeviceIndex(self.device)
        self.masks: dict[tuple[int, ...], Tensor] = {}
        for k, model in enumerate(models):
            for name, p in model.named_parameters():
                p.data = self.params[name].detach()[k]
                p.grad = None  # a gradient left by a hook must not join the first step
            for name, b in model.named_buffers():
                b.data = self.buffers[name][k]

    def select(self, group: list[int]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The group's rows: the stacks themselves for the whole cohort, else stacked rows
        (differentiable into the stacks' gradients)."""
        if group == self.everyone:
            return self.params, self.buffers
        index = self.index(group)  # advanced indexing keeps each row's layout (index_select would not)
        return ({name: s[index] for name, s in self.params.items()},
                {name: b[index] for name, b in self.buffers.items()})

    def write_back_buffers(self, group: list[int], buffers: dict[str, Tensor]) -> None:
        if group == self.everyone:
            return  # BatchNorm updated the stacks in place
        index = self.index(group)
        with torch.no_grad():
            for name, buffer in buffers.items():
                self.buffers[name].index_copy_(0, index, buffer)

    def trainable(self) -> dict[str, Tensor]:
        """The trainable stacks, detached (the same storage: an in-place update moves them)."""
        return {name: s.detach() for name, s in self.params.items() if s.requires_grad}

    def zero_grad(self) -> None:
        for stack in self.params.values():
            stack.grad = None

    def collect_model_grads(self, clients: list[int]) -> None:
        """Adds the gradients that loss terms left on the clients' own parameters to their rows."""
        with torch.no_grad():
            for k in clients:
                for name, p in self.models[k].named_parameters():
                    if p.grad is not None:
                        stack = self.params[name]
                        if stack.grad is None:  # a parameter the forward pass does not use
                            stack.grad = torch.zeros_like(stack)
                        stack.grad[k] += p.grad
                        p.grad = None

    def rows(self, clients: list[int]) -> Tensor:
        """The clients as a ``[K]`` mask, made once per distinct list (read, never written)."""
        key = tuple(clients)
        if key not in self.masks:
            mask = torch.zeros(len(self.models), dtype=torch.bool, device=self.device)
            self.masks[key] = mask.index_fill_(0, self.index(clients), True)
        return self.masks[key]

    def row(self, k: int) -> list[Tensor]:
        """A copy of client k's parameters and buffers."""
        with torch.no_grad():
            return [s[k].clone() for s in [*self.params.values(), *self.buffers.values()]]

    def put_back(self, rows: dict[int, list[Tensor]]) -> None:
        """Client rows copied by :meth:`row` written back into the stacks."""
        with torch.no_grad():
            for k, saved in rows.items():
                for stack, value in zip([*self.params.values(), *self.buffers.values()], saved):
                    stack[k].copy_(value)


class StackedPull:
    """The clients' :class:`~defenses.base.QuadraticPull` terms in one pass over the
    parameter stacks: ``[K]`` terms ``weight_k * sum_i (W_i[k] - A_i[k])^2 * S_i[k]`` for
    the clients that have one (their rows only, gathered when not every client has one)
    and exactly 0 for the others. The per-row arithmetic, in the parameters' dtype, is the
    term's own, so each client's gradient is the one it gets alone."""

    def __init__(self, names: list[str], rows: list[int], size: int, anchor: dict[str, Tensor],
                 scale: dict[str, Tensor], weight: Tensor) -> None:
        self.names, self.rows, self.size = names, rows, size
        self.anchor, self.scale, self.weight = anchor, scale, weight
        self.index = None if len(rows) == size else torch.tensor(rows, device=weight.device)

    @classmethod
    def of(cls, jobs: list[ClientJob], stacks: "ClientStacks") -> "StackedPull | None":
        """The jobs' pulls over their models' trainable parameters (in order), or None if no
        job has one (other loss terms stay each client's own)."""
        names = [name for name, p in jobs[0].model.named_parameters() if p.requires_grad]
        rows = [k for k, job in enumerate(jobs) if isinstance(job.regularizer, QuadraticPull)
                and len(job.regularizer.params) == len(names)
                and all(a is b for a, b in zip(job.regularizer.params, trainable_parameters(job.model)))]
        if not rows:
            return None
        pulls = [jobs[k].regularizer for k in rows]
        anchor = {name: torch.stack([pull.anchor[i] for pull in pulls]) for i, name in enumerate(names)}
        scale = {name: torch.stack([pull.scale[i] for pull in pulls]) for i, name in enumerate(names)}
        dtype = stacks.params[names[0]].dtype
        weight = torch.tensor([pull.weight for pull in pulls], dtype=dtype, device=stacks.device)
        return cls(names, rows, len(jobs), anchor, scale, weight)

    def full(self, stable: Callable[[tuple, Tensor], Tensor] = unstable) -> "Pull":
        """Anchors, scales and weights of every row of the cohort: zeros (a term of exactly 0)
        where a client has no pull."""
        def every_row(key: tuple, stack: Tensor) -> Tensor:
            if self.index is not None:
                stack = stack.new_zeros(self.size, *stack.shape[1:]).index_copy_(0, self.index, stack)
            return stable(key, stack)

        return ({name: every_row(("anchor", name), a) for name, a in self.anchor.items()},
                {name: every_row(("scale", name), s) for name, s in self.scale.items()},
                every_row(("pull weight",), self.weight))

    def terms(self, stacks: "ClientStacks", compute: Callable[..., Tensor] | None = None) -> Tensor:
        """``[K]`` terms; ``compute`` is :func:`quadratic_terms` or a compiled copy of it."""
        def pulled(stack: Tensor) -> Tensor:
            return stack if self.index is None else stack.index_select(0, self.index)

        terms = (compute or quadratic_terms)([pulled(stacks.params[name]) for name in self.names],
                                             [self.anchor[name] for name in self.names],
                                             [self.scale[name] for name in self.names], self.weight)
        if self.index is None:
            return terms
        return torch.zeros(self.size, dtype=terms.dtype, device=terms.device).index_add(0, self.index, terms)


class StackedSGD:
    """``torch.optim.SGD(foreach=True)``'s update (weight decay, momentum; no dampening, no
    Nesterov) on the stacks, with the same foreach operations so the numbers match. As
    torch's SGD skips a parameter without a gradient (frozen, or unused this step), a
    stack without one is skipped; with ``rows`` only those clients move: a client without
    a batch this step keeps its weights and momentum. The momentum starts at zero, which
    gives SGD's first step (``buf = grad``) exactly."""

    def __init__(self, stacks: list[Tensor], lr: float, momentum: float, weight_decay: float,
                 stable: Callable[[tuple, Tensor], Tensor] = unstable) -> None:
        self.stacks = [s for s in stacks if s.requires_grad]
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.momenta = ([stable(("momentum", i), torch.zeros_like(s)) for i, s in enumerate(self.stacks)]
                        if momentum else [])

    @torch.no_grad()
    def step(self, rows: Tensor | None) -> None:
        live = [i for i, s in enumerate(self.stacks) if s.grad is not None]
        if not live:
            return
        stacks, grads = [self.stacks[i] for i in live], [self.stacks[i].grad for i in live]
        if self.weight_decay:
            grads = torch._foreach_add(grads, stacks, alpha=self.weight_decay)
        if self.momentum:
            old = [self.momenta[i] for i in live]
            momenta = torch._foreach_mul(old, self.momentum)
            torch._foreach_add_(momenta, grads)
            grads = momenta if rows is None else masked(rows, momenta, old)
            for i, momentum in zip(live, grads):
                self.momenta[i] = momentum
        if rows is None:  # every client moves: in place, one foreach kernel
            torch._foreach_add_(stacks, grads, alpha=-self.lr)
            return
        moved = torch._foreach_add(stacks, grads, alpha=-self.lr)
        torch._foreach_copy_(stacks, masked(rows, moved, stacks))


# A compiled step computes K, ceil(K/2) or ceil(K/4) rows: at the papers' partition of
# Fashion-MNIST (clients of 3.5k-8.2k samples, 10 epochs) 88% of the rows computed are live
# clients' (66% computing all K rows every step; 93% halving down to one row, for 5 graphs).
BUCKETS = 3


def bucket_rows(live: list[int], clients: int) -> list[int]:
    """The rows a compiled step computes: the live clients, padded with clients done with
    their epochs (the lowest first) to the smallest of K, ceil(K/2), ceil(K/4) rows that
    holds them; sorted."""
    size = min(b for b in (-(-clients // 2**j) for j in range(BUCKETS)) if b >= len(live))
    if size == clients:
        return list(range(clients))
    alive = set(live)
    riders = [k for k in range(clients) if k not in alive][:size - len(live)]
    return sorted(live + riders)


def trains_as_cohort(config: LocalTrainConfig, device: torch.device, cannot: str | None) -> bool:
    """Whether a run trains each round's clients as one cohort: ``train.cohort`` when true or
    false; ``auto``: yes on CUDA or with ``train.compile`` set, unless the cohort cannot
    train the run (``cannot``, from :func:`cohort_cannot_train`: then sequentially, as on a CPU)."""
    if config.cohort != "auto":
        return bool(config.cohort)
    return (device.type == "cuda" or config.compile is not None) and cannot is None


def cohort_cannot_train(model: nn.Module, precision: str) -> str | None:
    """Why a cohort cannot train this model in this precision, or None: vmap refuses random
    layers (each client would need its own random draws) and BatchNorm(momentum=None)'s
    in-place count of batches; one loss scaler (16-mixed) would skip every client's step
    when one client overflows. Found from the model's modules (Dropout's family, RReLU,
    BatchNorm): randomness inside a ``forward`` (``F.dropout``) shows only when the cohort
    runs, as one message (:func:`cohort_errors`)."""
    if precision == "16-mixed":
        return "16-mixed precision scales the loss of all clients together"
    for name, module in model.named_modules():
        if isinstance(module, (nn.modules.dropout._DropoutNd, nn.RReLU)):
            return f"{name} ({type(module).__name__}) draws random numbers"
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.momentum is None:
            return f"{name} is BatchNorm(momentum=None)"
    return None


@contextmanager
def cohort_errors(cohort: bool | str, compile_mode: str | None) -> Iterator[None]:
    """A model the cohort cannot vmap fails with one message saying what to do; running out
    of memory is not that, and stays torch's own error."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as err:  # torch.compile's errors are RuntimeErrors too
        chosen = "train.cohort=true" if cohort is True else f"train.cohort={cohort} (a cohort here)"
        compiling = " (or train.compile=null if compiling is what failed)" if compile_mode else ""
        raise FedbenchError(f"{chosen} cannot train this model ({err}); models with random layers (Dropout, "
                            "RReLU, F.dropout in forward) or BatchNorm(momentum=None) need train.cohort=false"
                            + compiling) from err


def quadratic_terms(params: list[Tensor], anchors: list[Tensor], scales: list[Tensor], weight: Tensor) -> Tensor:
    """``weight_k * sum_i (W_i[k] - A_i[k])^2 * S_i[k]`` for each row k of the ``[K, ...]`` stacks."""
    total = sum(((w - a).pow(2) * s).flatten(1).sum(1) for w, a, s in zip(params, anchors, scales))
    return weight * total


def masked(rows: Tensor, new: list[Tensor], old: list[Tensor]) -> list[Tensor]:
    """``new`` in the rows, ``old`` elsewhere."""
    return [torch.where(rows.view(-1, *([1] * (n.dim() - 1))), n, o) for n, o in zip(new, old)]


def stacked(models: list[nn.Module], named) -> dict[str, Tensor]:
    """``{name: [K, ...]}`` of the models' parameters (differentiable) or buffers."""
    per_model = [dict(named(m)) for m in models]
    return {name: vmappable(torch.stack([tensors[name] for tensors in per_model])) for name in per_model[0]}


def vmappable(stack: Tensor) -> Tensor:
    """On CUDA, BatchNorm asks a channels_last tensor for its layout, which vmap cannot answer:
    there the stack is made contiguous. On CPU it keeps the sequential trainer's layout, so
    both sum in the same order."""
    return stack.contiguous() if stack.is_cuda else stack


def explicit_batch_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                        weight: Tensor | None = None, bias: Tensor | None = None, training: bool = False,
                        momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """``F.batch_norm`` in plain tensor operations, computed in float32 (float64 stays
    float64) and cast back to the input's dtype: ``y = (x - mean) / sqrt(var + eps) * weight
    + bias`` over every dimension but the channels, with the batch's biased variance in
    training (and the running statistics updated: ``r = (1 - momentum) r + momentum s``, the
    variance's ``s`` unbiased), the running statistics otherwise."""
    compute = torch.promote_types(input.dtype, torch.float32)
    x = input.to(compute)
    shape = [1, -1] + [1] * (x.dim() - 2)
    if training or running_mean is None:
        dims = [0] + list(range(2, x.dim()))
        count = x.numel() // x.shape[1]
        if training and count <= 1:  # as F.batch_norm: one value per channel has no variance
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.shape}")
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
        if training and running_mean is not None and running_var is not None:
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(momentum * mean.detach().to(running_mean.dtype))
                unbiased = var.detach() * (count / max(count - 1, 1))
                running_var.mul_(1 - momentum).add_(momentum * unbiased.to(running_var.dtype))
    else:
        mean, var = running_mean.to(compute), running_var.to(compute)
    y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + eps)
    if weight is not None:
        y = y * weight.to(compute).view(shape)
    if bias is not None:
        y = y + bias.to(compute).view(shape)
    return y.to(input.dtype)


@contextmanager
def functional_replaced(name: str, replacement: Callable, enabled: bool) -> Iterator[None]:
    """While open (and ``enabled``), ``torch.nn.functional.<name>`` is ``replacement``:
    torch's modules look it up at call time (BatchNorm's forward calls ``F.batch_norm``,
    Conv2d's ``F.conv2d``). Process-wide: one cohort's model runs in it at a time."""
    if not enabled:
        yield
        return
    original = getattr(F, name)
    setattr(F, name, replacement)
    try:
        yield
    finally:
        setattr(F, name, original)


def batch_norm_as_tensor_ops(enabled: bool) -> contextlib.AbstractContextManager:
    """Every BatchNorm module computes with :func:`explicit_batch_norm` while open."""
    return functional_replaced("batch_norm", explicit_batch_norm, enabled)


def convolutions_as_matmul(enabled: bool) -> contextlib.AbstractContextManager:
    """Every ``nn.Conv2d``, and every call of ``F.conv2d`` looked up at call time (not
    ``torch.conv2d``, nor a ``conv2d`` imported by name before), computes with
    :func:`~fedbench.matmul_conv.conv2d_as_matmul` while open."""
    return functional_replaced("conv2d", matmul_conv.conv2d_as_matmul, enabled)


def convolutions_per_client(enabled: bool) -> contextlib.AbstractContextManager:
    """Every ``F.conv2d`` call looked up at call time computes with
    :func:`~fedbench.client_conv.conv2d_per_client` (under vmap, one kernel launch for
    every client) while open."""
    if not enabled:
        return contextlib.nullcontext()
    from fedbench.client_conv import conv2d_per_client  # registers its operators once, where used

    return functional_replaced("conv2d", conv2d_per_client, enabled)


def convolutions_in_autocast_dtype(enabled: bool) -> contextlib.AbstractContextManager:
    """Every ``F.conv2d`` call runs :func:`~fedbench.matmul_conv.conv2d_in_autocast_dtype`
    while open."""
    return functional_replaced("conv2d", matmul_conv.conv2d_in_autocast_dtype, enabled)


def cohort_batch(pipeline: ImagePipeline, raws: list[RawBatch],
                 plans: list[BatchPoisoning | None]) -> tuple[Tensor, Tensor]:
    """Model inputs ``[K, B, ...]`` and labels ``[K, B]`` of K same-shape client batches: one
    pipeline pass over all their samples with each client's own draws (every step is per
    image, so each row is bit for bit that client's batch, for a launch count that does not
    grow with K), then each client's own poisoning."""
    inputs = pipeline.apply(torch.cat([raw.images for raw in raws]), Augmentation.concat([raw.draws for raw in raws]))
    inputs = inputs.unflatten(0, (len(raws), -1))
    labels = torch.stack([raw.labels for raw in raws])
    for k, (raw, plan) in enumerate(zip(raws, plans)):
        if plan is not None:
            inputs[k], labels[k] = plan.apply(inputs[k], labels[k], raw.index)
    return inputs, labels


class BatchByBatch:
    """The cohort's batches client by client: each client's own batch stream, the clients
    grouped by their batch's shape, one pipeline pass per group (any cohort; the
    :class:`~fedbench.cohort_feed.CohortFeed` serves those with whole batches only)."""

    def __init__(self, trainer: LocalTrainer, jobs: list[ClientJob]) -> None:
        self.pipeline, self.plans = trainer.pipeline, [job.plan for job in jobs]
        self.streams = [trainer.raw_epochs(job.data, job.generator, endless=job.step_limit(trainer.config) is not None)
                        for job in jobs]

    def next(self, active: list[int]) -> list["Group"]:
        batches = next_batches(self.streams, active)
        return [(group, *cohort_batch(self.pipeline, [batches[k] for k in group], [self.plans[k] for k in group]))
                for group in same_shape_groups(batches)]


def next_batches(streams: list[Iterator[Batch]], active: list[int]) -> dict[int, Batch]:
    """The next batch of every active client whose epochs are not done."""
    batches = {}
    for k in active:
        batch = next(streams[k], None)
        if batch is not None:
            batches[k] = batch
    return batches


def same_shape_groups(batches: dict[int, Batch],
                      shape_of: Callable[[Batch], tuple] = lambda raw: tuple(raw.images.shape)) -> list[list[int]]:
    """Clients grouped by their batch's shape (in client order; ``shape_of`` reads it, by
    default a RawBatch's images' shape)."""
    groups: dict[tuple, list[int]] = {}
    for k, batch in batches.items():
        groups.setdefault(shape_of(batch), []).append(k)
    return list(groups.values())
