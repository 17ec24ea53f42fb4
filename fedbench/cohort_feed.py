"""A cohort step's batches for all its clients at once: a few gathers, however many clients.

Batch by batch, a cohort of K clients pays K times per step for what each client does
alone: take its next batch (index its data, slice its draws) and poison it. With several
grid cells packed into one cohort (K = 70 for seven paper cells) that per-client work,
not the model, bounds a GPU step. :class:`CohortFeed` keeps every client's current epoch
in one row of device tables instead: a pool holding every client's samples (their data
concatenated, kept while the cohort's clients stay the same), and per client its epoch's
sample order (as pool indices) and augmentation draws. A step then gathers every
client's batch from the tables with one index per table, runs the pipeline once, and
stamps every client of a blending backdoor in one pass.

What stays each client's own: its epochs are drawn from its own generator, at the
epoch's start, by :func:`fedbench.client.epoch_order`, the call sequential training
makes, so each client's rows are bit for bit the batches it trains on alone (tested);
the clients of every backdoor that blends its trigger (:class:`TriggerStamps`: every
registered backdoor, whatever its trigger parts or grid cell) are stamped together, each
with its own trigger, target and poisoned samples; any other poisoning (label flipping, a
backdoor with its own ``apply_trigger``) is applied per client, as alone.

Serves cohorts whose every client has whole batches only (``drop_last`` and at least one
batch of data: the papers' setting); a cohort with a short batch goes batch by batch
(:class:`fedbench.cohort.BatchByBatch`).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from attacks.base import BackdoorAttack, BatchPoisoning, PoisonPlan
from fedbench.client import ClientJob, LocalTrainer, epoch_order
from fedbench.compiling import mark_static, unstable
from fedbench.data import Augmentation, ImagePipeline, ImageSet

Group = tuple[list[int], Tensor, Tensor]  # clients (cohort rows), inputs [G, B, ...], labels [G, B]


class CohortFeed:
    """Every active client's next batch, gathered for all of them in one pass.

    At cohort step ``t`` client k, whose current epoch began at step ``s_k``, takes its
    epoch's batch ``t - s_k``; it starts a new epoch after its ``n_k // B`` batches, and
    has batches for ``local_epochs`` epochs (or for ever, when its job counts steps:
    ``local_steps``, or the job's own ``max_steps``)."""

    def __init__(self, trainer: LocalTrainer, jobs: list[ClientJob], pool: "DataPool",
                 batches_of_rows: Callable[..., tuple[Tensor, Tensor, Tensor]] | None = None, static: bool = False,
                 stable: Callable[[tuple, Tensor], Tensor] = unstable) -> None:
        self.pipeline, self.batch_size = trainer.pipeline, trainer.config.batch_size
        self.generators = [job.generator for job in jobs]
        self.pool = pool
        self.sizes, self.base = pool.sizes, pool.base
        self.images, self.labels, self.device = pool.images, pool.labels, pool.labels.device
        self.batches = [n // self.batch_size for n in self.sizes]
        # per client: its epochs, or None where it counts steps over endless epochs
        self.epochs = [None if job.step_limit(trainer.config) is not None else trainer.config.local_epochs
                       for job in jobs]
        self.tables(max(self.batches) * self.batch_size, len(jobs), stable)
        self.step = 0
        # self.step on the device, advanced by row_batches (a round is served by rows or never)
        self.clock = stable(("clock",), torch.zeros((), dtype=torch.long, device=self.device))
        self.batches_of_rows = batches_of_rows or row_batches
        self.rows_of = DeviceIndex(self.device)
        self.poisoning(jobs)
        self.row_stamps = None if self.stamps is None else tuple(
            stable(("stamps", i), t) for i, t in enumerate(self.stamps.of_every_row(len(jobs))))
        if static:
            mark_static([self.clock, self.epochs_table(), self.pool_tensors(), self.pipeline.mean, self.pipeline.std,
                         self.row_stamps])

    @classmethod
    def of(cls, trainer: LocalTrainer, jobs: list[ClientJob], pool: "DataPool | None" = None,
           batches_of_rows: Callable[..., tuple[Tensor, Tensor, Tensor]] | None = None, static: bool = False,
           stable: Callable[[tuple, Tensor], Tensor] = unstable) -> CohortFeed | None:
        """A feed for these jobs (on ``pool`` if it holds their data, e.g. last round's), or
        None when some client's epoch has a short batch. ``batches_of_rows`` computes
        :func:`row_batches` (e.g. compiled); ``static`` marks the tensors it reads as
        static inputs (:func:`~fedbench.compiling.mark_static`), ``stable`` keeps them at
        one address round after round (:class:`~fedbench.compiling.StableTensors`)."""
        config = trainer.config
        if not config.drop_last or any(len(job.data) < config.batch_size for job in jobs):
            return None
        sets = [job.data for job in jobs]
        pool = pool if pool is not None and pool.holds(sets) else DataPool(sets)
        return cls(trainer, jobs, pool, batches_of_rows, static, stable)

    def tables(self, length: int, clients: int, stable: Callable[[tuple, Tensor], Tensor]) -> None:
        """Each client's epoch as one row: pool index, crop offsets, flips, and its start."""
        def zeros(name: str, *shape: int, dtype: torch.dtype = torch.long) -> Tensor:
            return stable((name,), torch.zeros(*shape, dtype=dtype, device=self.device))

        augment = self.pipeline.augment
        self.order = zeros("order", clients, length)
        self.offsets = zeros("offsets", clients, length, 2) if augment and self.pipeline.crop_padding > 0 else None
        self.flips = zeros("flips", clients, length, dtype=torch.bool) if augment and self.pipeline.hflip else None
        self.epoch_start = zeros("epoch start", clients)
        self.slots = stable(("slots",), torch.arange(self.batch_size, device=self.device))
        last = [(batches - 1) * self.batch_size for batches in self.batches]
        self.last_start = stable(("last start",), torch.tensor(last, dtype=torch.long, device=self.device))

    def poisoning(self, jobs: list[ClientJob]) -> None:
        """The clients stamped together (a :class:`PoisonPlan` of a backdoor that blends its
        trigger as the base class does: every registered one) and the other poisoners."""
        shapes = {k: shape for k, job in enumerate(jobs) if (shape := blended_trigger_shape(job.plan)) is not None}
        first = next(iter(shapes.values()), None)
        blended = [k for k, shape in shapes.items() if shape == first]  # stacked: one trigger shape
        self.stamps = TriggerStamps(blended, [job.plan for job in jobs], self.sizes) if blended else None
        self.others: dict[int, BatchPoisoning] = {k: job.plan for k, job in enumerate(jobs)
                                                  if job.plan is not None and k not in blended}

    def has_batch(self, k: int) -> bool:
        return self.epochs[k] is None or self.step < self.epochs[k] * self.batches[k]

    def next(self, active: list[int], rows: list[int] | None = None) -> list[Group]:
        """This step's batches of the active clients that have one, as one group; with
        ``rows`` (sorted, holding every active client with a batch), a batch for each of
        those clients instead, in that order (those done with their epochs get some of their
        last epoch's samples, drawing nothing): :func:`row_batches`."""
        group = [k for k in active if self.has_batch(k)]
        if not group:
            return []
        for k in group:
            if self.step % self.batches[k] == 0:
                self.start_epoch(k)
        if rows is not None:
            group = rows
            inputs, labels, index = self.batches_of_rows(self.clock, self.rows_of(rows), self.epochs_table(),
                                                     self.pool_tensors(), self.pipeline, self.row_stamps)
        else:
            inputs, labels, index = gather(self.step, self.rows_of(group), self.epochs_table(), self.pool_tensors(),
                                           self.pipeline, clamp=False)
            self.stamp_group(group, inputs, labels, index)
        self.poison_others(group, inputs, labels, index)
        self.step += 1
        return [(group, inputs, labels)]

    def epochs_table(self) -> EpochTable:
        return self.epoch_start, self.order, self.offsets, self.flips, self.slots, self.last_start

    def pool_tensors(self) -> tuple[Tensor, Tensor]:
        return self.images, self.labels

    def start_epoch(self, k: int) -> None:
        """Client k's next epoch from its own generator, as sequential training draws it."""
        order, draws, sizes = epoch_order(self.sizes[k], self.pipeline, self.batch_size, self.generators[k],
                                          self.device)
        used = sum(sizes)
        self.order[k, :used] = order[:used] + self.base[k]
        if draws is not None and draws.offsets is not None:
            self.offsets[k, :used] = draws.offsets.T
        if draws is not None and draws.flips is not None:
            self.flips[k, :used] = draws.flips
        self.epoch_start[k] = self.step

    def stamp_group(self, group: list[int], inputs: Tensor, labels: Tensor, index: Tensor) -> None:
        """In place: every blending backdoor's clients in ``group`` stamped in one pass."""
        if self.stamps is not None:
            self.stamps.apply(inputs, labels, index, {k: i for i, k in enumerate(group)}, self.rows_of)

    def poison_others(self, group: list[int], inputs: Tensor, labels: Tensor, index: Tensor) -> None:
        """In place: every other poisoner on its own batch (with its client-local sample indices)."""
        position = {k: i for i, k in enumerate(group)}
        for k, plan in self.others.items():
            if k in position:
                row = position[k]
                inputs[row], labels[row] = plan.apply(inputs[row], labels[row], index[row] - self.base[k])


# each client's epoch start, order, offsets, flips; a batch's slots; each client's last batch's first slot
EpochTable = tuple[Tensor, Tensor, "Tensor | None", "Tensor | None", Tensor, Tensor]
Stamps = tuple[Tensor, Tensor, Tensor, Tensor]  # per client: 1 - alpha, alpha * pattern, target; poisoned samples


def gather(step: int | Tensor, rows: Tensor, table: EpochTable, pool: tuple[Tensor, Tensor], pipeline: ImagePipeline,
           clamp: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Inputs ``[G, B, ...]``, labels and pool indices ``[G, B]`` of the ``rows``' batches at
    cohort step ``step``: each row's batch ``step - start`` of its epoch (with ``clamp``, a
    row past its epochs keeps to its last batch), through the pipeline in one pass."""
    epoch_start, order, offsets, flips, slots, last_start = table
    images, labels = pool
    starts = (step - epoch_start[rows]) * slots.shape[0]
    if clamp:
        starts = starts.minimum(last_start[rows])
    at = (rows.unsqueeze(1), starts.unsqueeze(1) + slots)  # [G, B]
    index = order[at]
    draws = Augmentation(None if offsets is None else offsets[at].flatten(0, 1).T,
                         None if flips is None else flips[at].flatten())
    inputs = pipeline.apply(images[index.flatten()], draws).unflatten(0, index.shape)
    return inputs, labels[index], index


def row_batches(clock: Tensor, rows: Tensor, table: EpochTable, pool: tuple[Tensor, Tensor],
                pipeline: ImagePipeline, stamps: Stamps | None) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`gather` for the ``rows`` at step ``clock`` (a device tensor, advanced in place),
    clamped, and every blending backdoor's clients among them stamped (``stamps``: one row
    per client of the cohort, :meth:`TriggerStamps.of_every_row`): pure tensor work, which
    a compiled cohort compiles into one graph per number of rows."""
    inputs, labels, index = gather(clock, rows, table, pool, pipeline, clamp=True)
    if stamps is not None:
        keep, blend, targets, poisoned = stamps
        stamp(inputs, labels, index, slice(None), keep[rows], blend[rows], targets[rows], poisoned)
    clock.add_(1)
    return inputs, labels, index


def stamp(inputs: Tensor, labels: Tensor, index: Tensor, rows: Tensor | slice, keep: Tensor, blend: Tensor,
          targets: Tensor, poisoned: Tensor) -> None:
    """In place, in the batches' ``rows``: ``x (1 - alpha) + alpha pattern`` and the target
    label where ``poisoned`` marks a sample (by pool index); each row its own trigger."""
    batch, batch_labels = inputs[rows], labels[rows]
    chosen = poisoned[index[rows]]
    stamped = batch * keep.unsqueeze(1) + blend.unsqueeze(1)
    inputs[rows] = torch.where(chosen.view(*chosen.shape, 1, 1, 1), stamped, batch)
    labels[rows] = torch.where(chosen, targets.unsqueeze(1), batch_labels)


def blended_trigger_shape(plan: BatchPoisoning | None) -> torch.Size | None:
    """The ``[C, H, W]`` shape of the trigger of a plain :class:`PoisonPlan` of a backdoor with
    the base class's blend whose alpha and pattern are whole images (every registered
    backdoor); None for any other plan."""
    if type(plan) is not PoisonPlan or type(plan.attack).apply_trigger is not BackdoorAttack.apply_trigger:
        return None
    alpha, pattern = plan.attack.trigger(plan.parts)
    return alpha.shape if alpha.dim() == 3 and alpha.shape == pattern.shape else None


class TriggerStamps:
    """The clients whose backdoor blends a trigger into their poisoned samples,
    ``x (1 - alpha_k) + alpha_k pattern_k`` with label ``target_k``
    (:meth:`attacks.base.BackdoorAttack.apply_trigger`), stamped in one pass whatever their
    attack, trigger parts (DBA) or grid cell. ``1 - alpha`` and ``alpha pattern`` are
    computed once, with the blend's own arithmetic, so every value equals the attack's own
    stamp; a sample is poisoned where its client's plan marks it."""

    def __init__(self, clients: list[int], plans: list[BatchPoisoning | None], sizes: list[int]) -> None:
        self.clients = clients
        triggers = [plans[k].attack.trigger(plans[k].parts) for k in clients]
        self.keep = torch.stack([1 - alpha for alpha, _ in triggers])
        self.blend = torch.stack([alpha * pattern for alpha, pattern in triggers])
        device = self.keep.device
        self.targets = torch.tensor([plans[k].attack.target_label for k in clients], device=device)
        self.poisoned = torch.cat([plan.mask.to(device, torch.bool) if k in clients
                                   else torch.zeros(n, dtype=torch.bool, device=device)
                                   for k, (plan, n) in enumerate(zip(plans, sizes))])

    def apply(self, inputs: Tensor, labels: Tensor, index: Tensor, position: dict[int, int],
              rows_of: Callable[[list[int]], Tensor]) -> None:
        """Stamp, in place, the rows (``position[client]``) of the clients that have a batch."""
        present = [i for i, k in enumerate(self.clients) if k in position]
        if not present:
            return
        at = rows_of([position[self.clients[i]] for i in present])
        keep, blend, targets = self.keep, self.blend, self.targets
        if len(present) < len(self.clients):
            mine = rows_of(present)
            keep, blend, targets = keep[mine], blend[mine], targets[mine]
        stamp(inputs, labels, index, at, keep, blend, targets, self.poisoned)

    def of_every_row(self, clients: int) -> Stamps:
        """Row k client k's (1 - alpha, alpha pattern, target) for each of the cohort's
        ``clients``; a client without a trigger gets (1, 0, 0) and no poisoned sample, so
        the stamp leaves its batch as it is (``where`` keeps its samples)."""
        keep = self.keep.new_ones(clients, *self.keep.shape[1:])
        blend = self.blend.new_zeros(clients, *self.blend.shape[1:])
        targets = self.targets.new_zeros(clients)
        rows = torch.tensor(self.clients, device=keep.device)
        return (keep.index_copy_(0, rows, self.keep), blend.index_copy_(0, rows, self.blend),
                targets.index_copy_(0, rows, self.targets), self.poisoned)


class DeviceIndex:
    """Lists of rows as device index tensors, each made once, not every step: a
    host-to-device copy of a fresh list would wait for the GPU's queued work."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.made: dict[tuple[int, ...], Tensor] = {}

    def __call__(self, rows: list[int]) -> Tensor:
        key = tuple(rows)
        if key not in self.made:
            self.made[key] = torch.tensor(rows, dtype=torch.long, device=self.device)
        return self.made[key]


class DataPool:
    """Every client's samples in one tensor, client after client (``base[k]`` where client
    k's start), so one index gathers any clients' batches. Built when the cohort's data
    change; a run whose clients are the same every round (the papers': all 10) builds it
    once, at the cost of one more copy of the clients' data on the device."""

    def __init__(self, sets: list[ImageSet]) -> None:
        self.sets = sets
        self.tensors = [(data.images, data.labels) for data in sets]
        self.versions = [(data.images._version, data.labels._version) for data in sets]
        self.sizes = [len(data) for data in sets]
        self.base = [sum(self.sizes[:k]) for k in range(len(sets))]
        self.images = torch.cat([data.images for data in sets])
        self.labels = torch.cat([data.labels for data in sets])

    def holds(self, sets: list[ImageSet]) -> bool:
        """Whether these are the pooled sets, in order, unchanged since (the same tensors, no
        in-place write)."""
        return (len(sets) == len(self.sets) and all(a is b for a, b in zip(sets, self.sets))
                and all(data.images is images and data.labels is labels
                        for data, (images, labels) in zip(sets, self.tensors))
                and self.versions == [(data.images._version, data.labels._version) for data in sets])
