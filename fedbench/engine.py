"""The federated round loop.

A round (:meth:`FederatedRun.run_round`) reads as its steps, each a short method:
1. ``select_clients``: all clients, or a seeded sample;
2. ``train_clients``: each selected client loads the global model and trains locally on
   the process that owns it; a malicious client runs the attack's client-side hooks
   (poisoned batches, extra loss term, per-step hook, crafted update) and whatever the
   attack makes of the defense's client-side protocol;
3. ``gather``: every process receives every client's :class:`ClientResult`, field by field;
4. ``attack_server_side``: the attack sees the whole round and may replace its own rows;
5. ``screen``: wrong-size and NaN/Inf updates, NaN/Inf protocol uploads (and, if set, too
   large updates) are rejected;
6. ``aggregate``: the defense aggregates the rest and gives its verdicts (an aggregate with
   NaN/Inf is refused and the round flagged ``non_finite_aggregate``);
7. ``server_step``: ``global += server_lr * aggregate``; buffers averaged over kept clients;
8. ``evaluate``: the global model on the clean and the triggered test set;
9. ``record``: the round's record, appended to ``metrics.jsonl`` and sent to the loggers.

With several processes (``--fabric.devices N``) client ``c`` trains on rank
``c % world_size``; results are gathered with Fabric's collectives and every process
applies the same aggregation. Every random draw is keyed by (seed, stream, round,
client), so the result equals the single-process run.
"""

from __future__ import annotations

import copy
import functools
import platform
import resource
import time
from collections import Counter
from dataclasses import dataclass, field
from statistics import fmean
from typing import Any, Callable

import torch
import torch.nn as nn
from torch import Tensor

from attacks.base import AttackSetup, ClientInfo, ServerView
from defenses.base import Aggregate, ClientHook, FinalView, HookCall, RoundContext, ServerTraining
from fedbench import __version__
from fedbench.checkpoint import Checkpoints
from fedbench.client import ClientJob, LocalResult, LocalTrainer, batches_per_epoch, iterate_batches
from fedbench.cohort import CohortTrainer, cohort_cannot_train, trains_as_cohort
from fedbench.config_changes import lossless, refuse_resuming_changed
from fedbench.data import FederatedData, ImageSet, load_federated_data
from fedbench.detection import detection_metrics, summarise_detection
from fedbench.errors import ConfigError
from fedbench.evaluation import evaluate, predict_labels
from fedbench.experiment import Experiment, defense_setup, expected_malicious, validate
from fedbench.fisher import cohort_passes
from fedbench.metrics import final_numbers, flat_metrics
from fedbench.models import build_model
from fedbench.params import ParameterLayout
from fedbench.partition import class_counts, partition_clients
from fedbench.results import METRICS, SUMMARY, append_jsonl, write_json_atomic, write_jsonl
from fedbench.screening import check_size, screen_updates
from fedbench.seeding import derive_seed, numpy_rng, seed_table, torch_generator

# Batches a client hook's batch iterators build at a time (see iterate_batches): 16 of 64
# images of 3x32x32 are 12.6 MB, and a GPU pays a batch's data launches once per 16 batches.
HOOK_BATCH_CHUNK = 16


@dataclass
class ClientResult:
    """What one client hands back after local training, on the process that trained it."""

    update: Tensor
    """``[d]`` float32: trained minus global parameters (as the attack crafted it)."""
    buffers: Tensor
    """``[b]`` float32: the client's buffers after training (BatchNorm statistics)."""
    steps: int
    loss: float
    """Mean training loss over the local steps."""
    uploads: dict[str, Tensor] = field(default_factory=dict)
    """Scalar uploads of the defense's client-side protocol, by name."""
    time_train: float = 0.0
    time_hook: float = 0.0
    wrong_size: bool = False
    """The update had the wrong size (it is replaced by zeros and rejected)."""


@dataclass
class GatheredRound:
    """Every selected client's result, stacked in selection order on every process."""

    clients: list[ClientInfo]
    updates: Tensor
    buffers: Tensor | None
    steps: Tensor
    loss: Tensor
    wrong_size: Tensor
    uploads: dict[str, Tensor]
    time_train: float
    time_hook: float

    @property
    def client_ids(self) -> Tensor:
        return torch.tensor([c.client_id for c in self.clients], dtype=torch.int64)


@dataclass
class Verdict:
    """The screening's and the defense's answer for one round (CPU tensors, ``[n]``)."""

    accepted: Tensor
    reasons: list[str | None]
    weights: Tensor
    excluded: Tensor
    aggregate: Aggregate | None = None
    non_finite_aggregate: bool = False
    info: dict[str, Any] = field(default_factory=dict)  # the defense's numbers, kept when refused


def versions() -> dict[str, str]:
    import lightning
    import torchvision

    return {
        "fedbench": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
    }


def code_revision() -> str | None:
    """The git commit of the code that runs (``+dirty`` with uncommitted changes to tracked
    files), or None outside a git checkout."""
    import subprocess
    from pathlib import Path

    where = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(where), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, timeout=10)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit.stdout.strip() + ("+dirty" if dirty else "")


def peak_memory_mb(device: torch.device) -> float:
    """GPU: the round's peak allocation. CPU: the process's peak resident memory so far."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def sum_of_terms(first: Callable[[], Tensor] | None, second: Callable[[], Tensor] | None):
    """One extra loss term from a defense's and an attack's (either may be None)."""
    if first is None or second is None:
        return first or second
    return lambda: first() + second()


def in_training_precision(model: nn.Module, fabric) -> nn.Module:
    """Fabric's true precisions (``64-true``, ``bf16-true``, ``16-true``) give the clients'
    parameters that dtype: the model is converted, and a forward pre-hook casts its
    floating inputs (the pipeline and the poisoning make them in float32) to it. Mixed
    precisions keep float32 parameters and compute under ``fabric.autocast()``. The
    server keeps float32 (global model, updates, aggregation)."""
    model = fabric.strategy.precision.convert_module(model)
    dtype = next(model.parameters()).dtype
    if dtype != torch.float32:
        model.register_forward_pre_hook(functools.partial(cast_floating_inputs, dtype))
    return model


def cast_floating_inputs(dtype: torch.dtype, module: nn.Module, args: tuple) -> tuple:
    return tuple(a.to(dtype) if isinstance(a, Tensor) and a.is_floating_point() else a for a in args)


def train_in_one_cohort(runs: list["FederatedRun"], clients: list[list[ClientInfo]]) -> list[list[ClientResult]]:
    """Each run's ``clients`` prepared on its own model copies, all trained in ONE cohort
    (the first run's cohort trainer: runs that share one are configured alike, see
    fedbench.together), then finished by their run. A run whose defense will train on
    server data this round (FLTrust) adds that training as one more row
    (:meth:`FederatedRun.server_job`). Each job is charged an equal share of the cohort's
    time (a server row's share goes to its round's aggregation time, where the server's
    training is counted when it trains alone)."""
    jobs = [run.cohort_jobs(mine) for run, mine in zip(runs, clients)]
    everyone = [job for run_jobs in jobs for job in run_jobs]
    servers = [(run, job) for run, mine in zip(runs, clients) if (job := run.server_job(mine)) is not None]
    started = time.perf_counter()
    trained = runs[0].cohort_trainer.train(everyone + [job for _, job in servers]) if everyone else []
    share = (time.perf_counter() - started) / max(len(trained), 1)
    for (run, _), result in zip(servers, trained[len(everyone):]):
        run.server_trained(result, share)
    results, position = [], 0
    for run, run_jobs in zip(runs, jobs):
        mine_trained = trained[position:position + len(run_jobs)]
        position += len(run_jobs)
        results.append(run.finish_clients(run_jobs, mine_trained, [share] * len(run_jobs)))
    return results


def protocol_uploads(jobs: list[ClientJob]) -> list[dict[str, Tensor]]:
    """Each client's uploads from its defense protocol's ``after_training_together``."""
    uploads: list[dict[str, Tensor]] = [{} for _ in jobs]
    for protocol, members, calls in by_protocol(jobs):
        for position, sent in zip(members, protocol.after_training_together(calls)):
            uploads[position] = sent
    return uploads


def by_protocol(jobs: list[ClientJob]) -> list[tuple[ClientHook, list[int], list[HookCall]]]:
    """The jobs grouped by the defense protocol object they run (the honest clients share
    the defense's; an adaptive attacker runs its own): each group's protocol, its jobs'
    positions and their hook calls, for the protocol's ``*_together`` methods."""
    groups: dict[int, list[int]] = {}
    for position, job in enumerate(jobs):
        if job.protocol is not None:
            groups.setdefault(id(job.protocol), []).append(position)
    return [(jobs[members[0]].protocol, members, [HookCall(jobs[i].client, jobs[i].model, *jobs[i].batches)
                                                  for i in members]) for members in groups.values()]


@dataclass
class ServerTrainingAhead:
    """A defense's server training, trained with the clients before the defense asks."""

    round: int
    plan: ServerTraining
    params: Tensor  # the global parameters it started from
    job: ClientJob
    trained_steps: int = -1  # set once trained
    seconds: float = 0.0  # its share of the cohort's training time

    def answers(self, params: Tensor, data: ImageSet, steps: int, round_index: int) -> bool:
        """Whether this is the ``server_train`` call asked for (the same objects, the steps trained)."""
        return (round_index == self.round and params is self.params and data is self.plan.data
                and steps == self.plan.steps == self.trained_steps)


@dataclass
class OpenRound:
    """A round whose clients are chosen and not yet trained."""

    index: int
    clients: list[ClientInfo]
    started: float


class FederatedRun:
    """One run of an :class:`Experiment` on a Fabric instance."""

    def __init__(self, exp: Experiment, fabric=None) -> None:
        validate(exp)
        self.exp = exp
        if exp.fabric.cpu_threads is not None:
            torch.set_num_threads(exp.fabric.cpu_threads)
        if fabric is None:
            from lightning.fabric import Fabric

            fabric = Fabric(accelerator=exp.fabric.accelerator, devices=1, precision=exp.fabric.precision)
        self.fabric = fabric
        self.device = fabric.device
        exp.fabric.apply_tf32(self.device)
        exp.train.check_device(self.device)
        self.rank = fabric.global_rank
        self.world = fabric.world_size
        self.seed = exp.seed
        self.run_dir = exp.run_dir
        self.records: list[dict] = []
        self.checkpoints = Checkpoints(self.run_dir, fabric)
        self._progress = None
        self.start_round = 0
        self.earlier_wall_time = 0.0  # seconds spent by earlier attempts, from the checkpoint
        self.started = time.perf_counter()
        self._setup_data()
        self._setup_model()
        self._setup_attack_and_defense()
        if exp.output.resume:
            self._resume()

    # ------------------------------------------------------------------ setup
    def _setup_data(self) -> None:
        exp = self.exp
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = False
        self.data: FederatedData = load_federated_data(exp.data, self.seed, self.device)
        pool = self.data.client_pool
        self.parts = partition_clients(pool.labels, exp.federation.num_clients, exp.partition, self.seed)
        self.client_sets: list[ImageSet] = [pool.subset(p.to(self.device)) for p in self.parts]
        self.num_samples = torch.tensor([len(s) for s in self.client_sets], dtype=torch.int64)
        self.partition_summary = class_counts(pool.labels, self.parts, self.data.num_classes)
        self.image_size = int(pool.images.shape[-1])

    def _setup_model(self) -> None:
        exp, pipeline = self.exp, self.data.pipeline
        torch.manual_seed(derive_seed(self.seed, "model_init"))
        model = build_model(exp.model.name, self.data.num_classes, pipeline.channels, self.image_size)
        model = in_training_precision(self.fabric.to_device(model), self.fabric)
        if exp.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.layout = ParameterLayout(model)
        self.global_params = self.layout.flatten(model).float()  # the server computes in float32
        self.global_buffers = self.layout.flatten_buffers(model).clone()
        self.trainer = LocalTrainer(model, exp.train, pipeline, self.fabric)
        cannot = cohort_cannot_train(model, exp.fabric.precision)
        if exp.train.cohort is True and cannot is not None:
            raise ConfigError([("train.cohort", True, f"false or auto for this run: {cannot}")])
        if exp.train.compile is not None and cannot is not None:
            raise ConfigError([("train.compile", exp.train.compile,
                                f"None for this run: it compiles a cohort, which cannot train it ({cannot})")])
        self.cohort = trains_as_cohort(exp.train, self.device, cannot)
        self.cohort_trainer = CohortTrainer(self.trainer)
        self._cohort_models: list[nn.Module] = []
        self._server_model: nn.Module | None = None  # the server's training in a cohort
        self._server_ahead: ServerTrainingAhead | None = None
        self._server_seconds_ahead = 0.0  # the answered row's training time, for the round's record

    def _setup_attack_and_defense(self) -> None:
        exp, num_clients, pipeline = self.exp, self.exp.federation.num_clients, self.data.pipeline
        self.malicious = exp.attack.malicious_clients(num_clients, self.seed)
        self.attacker_rank = {cid: i for i, cid in enumerate(self.malicious)}
        exp.attack.setup(AttackSetup(num_clients, self.data.num_classes, pipeline.channels, self.image_size,
                                     pipeline, self.device, self.seed, clean_update=self.clean_update))
        defense = exp.defense
        env = defense_setup(exp, self.layout, self.data, device=self.device,
                            server_train=self.server_train if defense.needs_server_data else None)
        problems = defense.problems(env)
        if problems:
            raise ConfigError(problems)
        defense.setup(env)
        self.hook: ClientHook | None = defense.client_hook()

    # ------------------------------------------------------------------ 1. select
    def select_clients(self, round_index: int) -> list[ClientInfo]:
        n, k = self.exp.federation.num_clients, self.exp.clients_per_round
        if k == n:
            chosen = list(range(n))
        else:
            draw = numpy_rng(self.seed, "sampling", round_index).choice(n, size=k, replace=False)
            chosen = sorted(int(c) for c in draw)
        return [self.client_info(c, round_index) for c in chosen]

    def client_info(self, client_id: int, round_index: int) -> ClientInfo:
        malicious = client_id in self.attacker_rank
        return ClientInfo(
            client_id=client_id,
            round=round_index,
            malicious=malicious,
            attacking=malicious and self.exp.attack.is_active(round_index),
            attacker_rank=self.attacker_rank.get(client_id, -1),
        )

    # ------------------------------------------------------------------ 2. train
    def train_clients(self, clients: list[ClientInfo]) -> list[ClientResult]:
        """Local training of the selected clients this process owns: one after another, or
        as one cohort (``train.cohort``, resolved for this run's device and model)."""
        mine = [c for c in clients if c.client_id % self.world == self.rank]
        if self.cohort and len(mine) > 1:
            return self.train_cohort(mine)
        results = []
        for position, client in enumerate(mine, 1):
            if self._progress is not None:
                self._progress.set_postfix_str(f"client {position}/{len(mine)} (id {client.client_id})")
            results.append(self.train_client(client))
        return results

    def train_client(self, client: ClientInfo) -> ClientResult:
        """One client's local training from the global model, with the attack's and the
        defense's client-side hooks; returns what it sends."""
        job = self.prepare_clients([client], [self.model])[0]
        started = time.perf_counter()
        result = self.trainer.train(job.data, job.generator, job.plan, regularizer=job.regularizer,
                                    after_step=job.after_step)
        return self.finish_clients([job], [result], [time.perf_counter() - started])[0]

    def train_cohort(self, clients: list[ClientInfo]) -> list[ClientResult]:
        """The clients trained together (see fedbench.cohort), each on its own copy of the
        model; every hook runs as in :meth:`train_client`. Each client is charged an equal
        share of the cohort's training time."""
        return train_in_one_cohort([self], [clients])[0]

    def cohort_jobs(self, clients: list[ClientInfo]) -> list[ClientJob]:
        """The clients prepared for a cohort, each on its own copy of the model."""
        while len(self._cohort_models) < len(clients):
            self._cohort_models.append(copy.deepcopy(self.model))
        return self.prepare_clients(clients, self._cohort_models[:len(clients)])

    def prepare_clients(self, clients: list[ClientInfo], models: list[nn.Module]) -> list[ClientJob]:
        """Load the global model into each client's model and run the hooks that come before
        training: the defense's protocol for all the clients at once (its
        ``before_training_together``), then each attacking client's hooks. Each client is
        charged an equal share of the hooks' time."""
        jobs = [self.client_job(client, model) for client, model in zip(clients, models)]
        started = time.perf_counter()
        defense_terms: list = [None] * len(jobs)
        with cohort_passes(self.exp.train.compile, self.exp.train.cohort_convolution):
            for protocol, members, calls in by_protocol(jobs):
                for position, term in zip(members, protocol.before_training_together(calls)):
                    defense_terms[position] = term
        for job, defense_term in zip(jobs, defense_terms):
            attack_term, job.after_step = self._attack_training_hooks(job.client, job.model)
            job.regularizer = sum_of_terms(defense_term, attack_term)
        share = (time.perf_counter() - started) / max(len(jobs), 1)
        for job in jobs:
            job.time_hook = share
        return jobs

    def client_job(self, client: ClientInfo, model: nn.Module) -> ClientJob:
        """``client``'s job with the global model loaded into ``model``, before any hook."""
        attack, data = self.exp.attack, self.client_sets[client.client_id]
        plan = attack.poison_plan(client, len(data))
        self.layout.load(model, self.global_params)
        self.layout.load_buffers(model, self.global_buffers)
        generator = torch_generator(self.seed, "train", client.round, client.client_id, device=self.device)
        return ClientJob(client, model, data, generator, plan, self.protocol_of(client),
                         self._hook_batches(client, data, plan), regularizer=None, after_step=None, time_hook=0.0)

    def finish_clients(self, jobs: list[ClientJob], results: list[LocalResult],
                       time_train: list[float]) -> list[ClientResult]:
        """The hooks after training, and the updates the clients send: the attack's hook of
        every attacking client, then the defense's protocol for all of them at once
        (:func:`protocol_uploads`), then each client's update. Each client is charged an
        equal share of the hooks' time."""
        started = time.perf_counter()
        for job in jobs:
            if job.client.attacking:
                self.exp.attack.after_training(job.client, job.model)
        with cohort_passes(self.exp.train.compile, self.exp.train.cohort_convolution):
            uploads = protocol_uploads(jobs)
        share = (time.perf_counter() - started) / max(len(jobs), 1)
        return [self.client_result(job, result, sent, seconds, job.time_hook + share)
                for job, result, sent, seconds in zip(jobs, results, uploads, time_train)]

    def client_result(self, job: ClientJob, result: LocalResult, uploads: dict[str, Tensor], time_train: float,
                      time_hook: float) -> ClientResult:
        """The update one client sends (as the attack crafts it) and what it reports."""
        client, model, attack = job.client, job.model, self.exp.attack
        update = self.trained_minus(model, self.global_params)
        if client.attacking:
            update = attack.craft_update(update, client)
        wrong_size = check_size(update, self.layout.dim) is not None
        return ClientResult(
            update=torch.zeros(self.layout.dim, device=self.device) if wrong_size else update,
            buffers=self.layout.flatten_buffers(model), steps=result.steps, loss=result.mean_loss,
            uploads=uploads, time_train=time_train, time_hook=time_hook, wrong_size=wrong_size,
        )

    def protocol_of(self, client: ClientInfo) -> ClientHook | None:
        """The defense's client-side protocol as this client runs it: honestly, or as the
        attack makes a malicious client run it."""
        if self.hook is None or not client.malicious:
            return self.hook
        return self.exp.attack.client_protocol(client, self.hook)

    def _attack_training_hooks(self, client: ClientInfo, model: nn.Module):
        """``(extra loss term, after-step hook)`` of the attack for an attacking client."""
        if not client.attacking:
            return None, None
        attack = self.exp.attack
        return attack.before_training(client, model), attack.step_hook(client, model)

    def _hook_batches(self, client: ClientInfo, data: ImageSet, plan):
        """Batch iterators a client hook may use, each call drawing the same seeded batches."""
        batch_size, pipeline = self.exp.train.batch_size, self.data.pipeline
        key = (self.seed, "train", client.round, client.client_id)

        prepare = self.trainer.prepare

        def local_batches(clean: bool = False):
            generator = torch_generator(*key, 1, device=self.device)
            batches = iterate_batches(data, pipeline, batch_size, generator, poison=None if clean else plan,
                                      chunk=HOOK_BATCH_CHUNK)
            return ((prepare(x), y) for x, y in batches)

        def server_batches():
            generator = torch_generator(*key, 2, device=self.device)
            batches = iterate_batches(self.data.server, pipeline, batch_size, generator, chunk=HOOK_BATCH_CHUNK)
            return ((prepare(x), y) for x, y in batches)

        return local_batches, server_batches if self.exp.defense.needs_server_data else None

    def clean_update(self, client: ClientInfo) -> Tensor:
        """An honest local training of ``client`` on clean data from the global model (its
        own stream), for an attacker's estimates; reloads the global model afterwards."""
        self.layout.load(self.model, self.global_params)
        self.layout.load_buffers(self.model, self.global_buffers)
        generator = torch_generator(self.seed, "attack", client.round, client.client_id, 1, device=self.device)
        self.trainer.train(self.client_sets[client.client_id], generator)
        update = self.trained_minus(self.model, self.global_params)
        self.layout.load(self.model, self.global_params)
        self.layout.load_buffers(self.model, self.global_buffers)
        return update

    def server_job(self, clients: list[ClientInfo]) -> ClientJob | None:
        """The server training the defense will ask for this round (its
        ``server_training_plan`` at the clients' :meth:`expected_steps`), as one more job of
        their cohort: the global model on the server's data, its own seeded stream (the one
        :meth:`server_train` draws), exactly the planned steps; None if the defense plans
        none. :meth:`server_train` answers the call with it if the call is the one planned
        (else, e.g. screening dropped a client and the steps' median moved, it trains then).
        One process only: with several, each trains the server's update when asked, so all
        compute the same one."""
        defense = self.exp.defense
        if self.world != 1 or not defense.needs_server_data or not clients:
            return None
        expected = torch.tensor([self.expected_steps(c.client_id) for c in clients], dtype=torch.int64)
        plan = defense.server_training_plan(expected)
        if plan is None:
            return None
        if self._server_model is None:
            self._server_model = copy.deepcopy(self.model)
        self.layout.load(self._server_model, self.global_params)
        self.layout.load_buffers(self._server_model, self.global_buffers)
        round_index = clients[0].round
        generator = torch_generator(self.seed, "server", round_index, device=self.device)
        job = ClientJob(ClientInfo(-1, round_index), self._server_model, plan.data, generator, plan=None,
                        protocol=None, batches=(None, None), regularizer=None, after_step=None, time_hook=0.0,
                        max_steps=plan.steps)
        self._server_ahead = ServerTrainingAhead(round_index, plan, self.global_params, job)
        return job

    def server_trained(self, result: LocalResult, seconds: float) -> None:
        """The :meth:`server_job` of this round is trained (``result.steps`` steps, in its
        share ``seconds`` of the cohort's time)."""
        assert self._server_ahead is not None
        self._server_ahead.trained_steps = result.steps
        self._server_ahead.seconds = seconds

    def expected_steps(self, client_id: int) -> int:
        """The optimizer steps a client's local training takes, as the trainers count them:
        ``local_steps``, else ``local_epochs`` epochs of its batches."""
        train = self.exp.train
        if train.local_steps is not None:
            return train.local_steps
        size = len(self.client_sets[client_id])
        return train.local_epochs * batches_per_epoch(size, train.batch_size, train.drop_last)

    def server_train(self, params: Tensor, data: ImageSet, steps: int, round_index: int) -> Tensor:
        """Train a copy of the global model on server-held data (FLTrust's root set); the
        update trained ahead in the clients' cohort if it is this call's (:meth:`server_job`)."""
        ahead, self._server_ahead = self._server_ahead, None
        if ahead is not None and ahead.answers(params, data, steps, round_index):
            self._server_seconds_ahead = ahead.seconds
            return self.trained_minus(ahead.job.model, params)
        self.layout.load(self.model, params)
        self.layout.load_buffers(self.model, self.global_buffers)
        generator = torch_generator(self.seed, "server", round_index, device=self.device)
        self.trainer.train(data, generator, max_steps=steps)
        return self.trained_minus(self.model, params)

    def trained_minus(self, model: nn.Module, start: Tensor) -> Tensor:
        """A trained model's parameters minus the float32 ``start`` it was loaded with, in
        ``start``'s dtype. Under a true precision the client started from ``start`` rounded to
        its dtype: the difference is taken from that, so the rounding (bf16: ~10% of an
        update's norm) is not sent as training, in float64 and rounded once."""
        trained = self.layout.flatten(model)
        if trained.dtype == start.dtype:
            return trained - start
        return (trained.double() - start.to(trained.dtype).double()).to(start.dtype)

    # ------------------------------------------------------------------ 3. gather
    def gather(self, clients: list[ClientInfo], results: list[ClientResult]) -> GatheredRound:
        """Every client's result on every process, field by field, in selection order."""
        selected = [c.client_id for c in clients]

        def scalars(values: list) -> Tensor:
            return self._gather_scalars(selected, values)

        dim, buffer_dim = self.layout.dim, self.layout.buffer_dim
        upload_keys = self.hook.upload_keys if self.hook else ()
        return GatheredRound(
            clients=clients,
            updates=self._gather(selected, [r.update for r in results], (dim,), torch.float32),
            buffers=self._gather(selected, [r.buffers for r in results], (buffer_dim,), torch.float32)
            if buffer_dim else None,
            steps=scalars([r.steps for r in results]).round().to(torch.int64),
            loss=scalars([r.loss for r in results]),
            wrong_size=scalars([r.wrong_size for r in results]).cpu() > 0,
            uploads={key: self._gather_upload(selected, key, results) for key in upload_keys},
            time_train=float(scalars([r.time_train for r in results]).sum()),
            time_hook=float(scalars([r.time_hook for r in results]).sum()),
        )

    def _gather_upload(self, selected: list[int], key: str, results: list[ClientResult]) -> Tensor:
        """One upload of the defense's client protocol, ``[n, *shape]``: scalars in float64,
        vectors in float32."""
        shape = self.hook.upload_shape(key, self.layout.dim)
        if shape == ():
            return self._gather_scalars(selected, [r.uploads[key] for r in results])
        rows = [r.uploads[key].reshape(shape).to(self.device, torch.float32) for r in results]
        return self._gather(selected, rows, shape, torch.float32)

    def _gather_scalars(self, selected: list[int], values: list) -> Tensor:
        """One number per client (Python or 0-d tensor), gathered as float64 ``[n]``."""
        rows = [torch.tensor(float(v), device=self.device, dtype=torch.float64) for v in values]
        return self._gather(selected, rows, (), torch.float64)

    def _gather(self, selected: list[int], rows: list[Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """Stack per-client rows in ``selected`` order across all processes.

        Client c trains on rank ``c % world``; every rank joins the collective even when
        it trained no client this round.
        """
        if self.world == 1:
            return torch.stack(rows)
        per_rank = max(sum(1 for c in selected if c % self.world == r) for r in range(self.world))
        padded = torch.zeros((per_rank, *shape), device=self.device, dtype=dtype)
        if rows:
            padded[: len(rows)] = torch.stack(rows)
        gathered = self.fabric.all_gather(padded)  # [world, per_rank, ...]
        slots = dict.fromkeys(range(self.world), 0)
        out = []
        for c in selected:
            owner = c % self.world
            out.append(gathered[owner, slots[owner]])
            slots[owner] += 1
        return torch.stack(out)

    # ------------------------------------------------------------------ 4. attack (server side)
    def attack_server_side(self, round_: GatheredRound) -> None:
        """The attack may replace its own rows, knowing the whole round; no other row changes."""
        own = torch.tensor([c.attacking for c in round_.clients], dtype=torch.bool)
        if not own.any():
            return
        client_ids = round_.client_ids
        round_index = round_.clients[0].round
        # The attack reads a copy: whatever it does to it, only its own rows reach the server.
        view = ServerView(
            round=round_index, updates=round_.updates.clone(), own=own.to(self.device), client_ids=client_ids,
            num_samples=self.num_samples[client_ids], global_params=self.global_params,
            expected_malicious=expected_malicious(self.exp),
            generator=torch_generator(self.seed, "attack", round_index, device=self.device),
        )
        rows = self.exp.attack.craft_round(view)
        if rows is None:
            return
        expected = (int(own.sum()), self.layout.dim)
        if tuple(rows.shape) != expected:
            raise ValueError(f"attack {self.exp.attack.name}: craft_round returned rows of shape "
                             f"{tuple(rows.shape)}, expected {expected} (one row per attacking client)")
        round_.updates[view.own] = rows.to(round_.updates.device, round_.updates.dtype)

    # ------------------------------------------------------------------ 5. screen, 6. aggregate
    def screen(self, round_: GatheredRound) -> Verdict:
        accepted, reasons = screen_updates(round_.updates, self.exp.federation.max_update_norm,
                                           round_.wrong_size.tolist(), round_.uploads)
        n = len(round_.clients)
        return Verdict(accepted, reasons, torch.zeros(n, dtype=torch.float64), ~accepted.cpu())

    def aggregate(self, round_: GatheredRound, verdict: Verdict) -> None:
        """The defense aggregates the screened-in updates; its verdicts fill ``verdict``."""
        if not verdict.accepted.any():
            return
        kept = verdict.accepted.nonzero().squeeze(1)
        kept_cpu = kept.cpu()
        client_ids = round_.client_ids[kept_cpu]
        ctx = RoundContext(
            round=round_.clients[0].round,
            client_ids=client_ids,
            global_params=self.global_params,
            local_steps=round_.steps[kept_cpu],
            uploads={k: v[kept] for k, v in round_.uploads.items()},
            generator=torch_generator(self.seed, "defense", round_.clients[0].round, device=self.device),
        )
        defense = self.exp.defense
        state_before = copy.deepcopy(defense.state_dict())  # what a refused round must not change
        aggregate = defense.aggregate(round_.updates[kept], self.num_samples[client_ids].to(self.device), ctx)
        verdict.weights[kept_cpu] = aggregate.weights.detach().double().cpu()
        verdict.excluded[kept_cpu] = aggregate.excluded.cpu()
        verdict.info = aggregate.info
        # Finite updates can still sum to Inf/NaN (huge ones weighted up): the server refuses
        # such an aggregate as it refuses a non-finite update, keeps its model and the defense's
        # state, and records the round, so a diverging defense gives a number (its last finite
        # model) and a flag, not a crash.
        verdict.non_finite_aggregate = not bool(torch.isfinite(aggregate.update).all())
        if verdict.non_finite_aggregate:
            defense.load_state_dict(state_before)
        verdict.aggregate = None if verdict.non_finite_aggregate else aggregate

    # ------------------------------------------------------------------ 7. server step
    def server_step(self, round_: GatheredRound, verdict: Verdict) -> None:
        if verdict.aggregate is None:  # every update rejected, or the aggregate refused: the model stays
            return
        self.global_params = self.global_params + self.exp.federation.server_lr * verdict.aggregate.update
        if round_.buffers is not None:
            self._update_buffers(round_.buffers, ~verdict.excluded, round_.client_ids)

    def _update_buffers(self, buffers: Tensor, kept: Tensor, client_ids: Tensor) -> None:
        """Sample-count weighted mean of non-excluded clients' buffers (see fedbench.params)."""
        if not kept.any():
            return
        counts = self.num_samples[client_ids[kept]].double()
        weights = (counts / counts.sum()).to(self.device, torch.float32)
        self.global_buffers = weights @ buffers[kept.to(self.device)]

    # ------------------------------------------------------------------ 8. evaluate
    def evaluate(self, round_index: int) -> dict[str, Any]:
        metrics: dict[str, Any] = {"clean_acc": None, "clean_loss": None, "asr": None, "asr_all": None}
        if not self._evaluate_this_round(round_index) or self.rank != 0:
            return metrics
        exp = self.exp
        self.layout.load(self.model, self.global_params)
        self.layout.load_buffers(self.model, self.global_buffers)
        return evaluate(self.model, self.data.test, self.data.pipeline, exp.attack, self.data.num_classes,
                        exp.federation.eval_batch_size, self.fabric.autocast, exp.train.channels_last,
                        exp.train.compile)

    def defense_final_numbers(self) -> dict[str, float | None]:
        """What the defense measures on the final model (e.g. CRFL's smoothing); rank 0 only.
        Its random stream is the defense stream keyed by ``rounds`` (one past the last round)."""
        if self.rank != 0:
            return {}
        exp = self.exp
        attack, test = exp.attack, self.data.test

        def predict(params: Tensor, count: int) -> tuple[Tensor, Tensor | None]:
            self.layout.load(self.model, params)
            self.layout.load_buffers(self.model, self.global_buffers)
            return predict_labels(self.model, test.images[:count], self.data.pipeline, attack,
                                  exp.federation.eval_batch_size, self.fabric.autocast, exp.train.channels_last)

        view = FinalView(self.global_params, predict, test.labels, getattr(attack, "target_label", None),
                         self.data.num_classes, torch_generator(self.seed, "defense", exp.federation.rounds, device=self.device))
        numbers = exp.defense.final_evaluation(view)
        self.layout.load(self.model, self.global_params)
        return numbers

    def _evaluate_this_round(self, round_index: int) -> bool:
        fed = self.exp.federation
        return (round_index + 1) % fed.eval_every == 0 or round_index >= fed.rounds - fed.final_rounds

    # ------------------------------------------------------------------ one round
    def run_round(self, round_index: int) -> dict:
        opened = self.open_round(round_index)
        return self.close_round(opened, self.train_clients(opened.clients))

    def open_round(self, round_index: int) -> "OpenRound":
        """Steps 1 and 2's start: the round's clients, chosen; the attack told the round began."""
        started = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        clients = self.select_clients(round_index)
        self.exp.attack.round_start(round_index, self.global_params)
        return OpenRound(round_index, clients, started)

    def close_round(self, opened: "OpenRound", results: list[ClientResult]) -> dict:
        """Steps 3-8 on the clients' results; the round's record."""
        round_index, started = opened.index, opened.started
        times: dict[str, float] = {}
        round_ = self.gather(opened.clients, results)
        attack_started = time.perf_counter()
        self.attack_server_side(round_)
        times["server_attack"] = time.perf_counter() - attack_started
        aggregation_started = time.perf_counter()
        verdict = self.screen(round_)
        self.aggregate(round_, verdict)
        self.server_step(round_, verdict)
        times["aggregation"] = time.perf_counter() - aggregation_started + self._server_seconds_ahead
        self._server_seconds_ahead = 0.0
        evaluation_started = time.perf_counter()
        metrics = self.evaluate(round_index)
        times["evaluation"] = time.perf_counter() - evaluation_started
        times["round"] = time.perf_counter() - started
        return self.record(round_index, round_, verdict, metrics, times)

    def record(self, round_index: int, round_: GatheredRound, verdict: Verdict, metrics: dict,
               times: dict[str, float]) -> dict:
        """The round's record (one line of metrics.jsonl)."""
        attacking = [c.attacking for c in round_.clients]
        weights, excluded = verdict.weights.tolist(), verdict.excluded.tolist()
        # Detection judges the defense: only the updates that passed the screening count.
        seen = verdict.accepted.cpu().tolist()
        detection = detection_metrics(*([v for v, s in zip(values, seen) if s]
                                        for values in (attacking, excluded, weights)))
        finite_updates = torch.nan_to_num(round_.updates, nan=0.0, posinf=0.0, neginf=0.0)
        selected = [c.client_id for c in round_.clients]
        return {
            "round": round_index,
            **metrics,
            "train_loss": float(round_.loss.mean()),
            "time": {"local_training": round_.time_train, "client_hook": round_.time_hook, **times},
            "peak_memory_mb": peak_memory_mb(self.device),
            "clients": selected,
            "malicious": [c.malicious for c in round_.clients],
            "attacking": attacking,
            "local_steps": round_.steps.tolist(),
            "update_norms": torch.linalg.vector_norm(finite_updates, dim=1).tolist(),
            "weights": weights,
            "excluded": excluded,
            "rejected": {str(c): r for c, r in zip(selected, verdict.reasons) if r is not None},
            "non_finite_aggregate": verdict.non_finite_aggregate,
            "detection": detection,
            "defense": verdict.info,
            "ended_at": time.time(),  # wall clock (Unix seconds): a grid's throughput, benchmarks/perf/projection.py
        }

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, round_index: int) -> None:
        """Every process: each holds the client-side state of the clients it trains."""
        self.checkpoints.save(round_index, server={
            "global_params": self.global_params.cpu(),
            "global_buffers": self.global_buffers.cpu(),
            "records": self.records,
            "defense": self.exp.defense.state_dict(),
            "attack": self.exp.attack.state_dict(),
            "wall_time_s": self.wall_time(),
            # what a resumed run is compared with (fedbench.config_changes)
            "config": self.exp.config,
            "device_type": self.device.type,
        }, clients={"hook": self.hook.state_dict() if self.hook else {}})

    def _resume(self) -> None:
        loaded = self.checkpoints.load(self.device)
        if loaded is None:
            return
        server, clients = loaded
        refuse_resuming_changed(self.run_dir, self.exp.config, server, self.device.type)
        self.global_params = server["global_params"].to(self.device)
        self.global_buffers = server["global_buffers"].to(self.device)
        self.records = list(server["records"])
        self.exp.defense.load_state_dict(server["defense"])
        self.exp.attack.load_state_dict(server.get("attack", {}))  # absent in checkpoints before attack state
        if self.hook:
            self.hook.load_state_dict(clients["hook"])
        self.start_round = int(server["round"]) + 1
        self.earlier_wall_time = float(server.get("wall_time_s", 0.0))  # absent in older checkpoints

    # ------------------------------------------------------------------ the run
    def run(self) -> dict:
        self.begin()
        for round_index in range(self.start_round, self.exp.federation.rounds):
            self.keep(self.run_round(round_index))
        return self.end()

    @property
    def next_round(self) -> int | None:
        """The round to run next (every round leaves one record), None when all are done."""
        return len(self.records) if len(self.records) < self.exp.federation.rounds else None

    def begin(self) -> None:
        """Before the first round of this attempt: the run's files, loggers and progress bar."""
        self.started = time.perf_counter()
        if self.rank == 0:
            self._write_run_start()
        self._progress = self._progress_bar() if self.rank == 0 and self.exp.output.progress else None

    def keep(self, record: dict) -> None:
        """A finished round: its record kept, written, logged, checkpointed when due."""
        round_index, every = record["round"], self.exp.output.checkpoint_every
        self.records.append(record)
        if self.rank == 0:
            append_jsonl(self.run_dir / METRICS, record)
            self.fabric.log_dict(flat_metrics(record), step=round_index)
        if every and (round_index + 1) % every == 0:
            self.save_checkpoint(round_index)
        if self._progress is not None:
            self._progress.update(1)
            self._progress.set_postfix(acc=record["clean_acc"], asr=record["asr"])

    def end(self) -> dict:
        """After the last round: the summary, with the defense's final numbers, written."""
        exp = self.exp
        if self._progress is not None:
            self._progress.close()
        summary = self.summary(self.wall_time())
        summary["final"].update(self.defense_final_numbers())
        if self.rank == 0:
            self.fabric.log_dict({f"final/{k}": v for k, v in summary["final"].items() if v is not None},
                                 step=exp.federation.rounds)
            write_json_atomic(self.run_dir / SUMMARY, summary)
        return summary

    def wall_time(self) -> float:
        """Seconds this run has taken so far, earlier attempts (up to their checkpoint) included."""
        return self.earlier_wall_time + time.perf_counter() - self.started

    def _write_run_start(self) -> None:
        """partition.json, the metrics file as the checkpoint has it, the loggers' hyperparameters."""
        exp = self.exp
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.run_dir / "partition.json", {
            "scheme": exp.partition.scheme,
            "class_counts": self.partition_summary,
            "num_samples": self.num_samples.tolist(),
            "server_split": len(self.data.server),
            "malicious": self.malicious,
        })
        # Whatever a killed earlier attempt left is replaced by what the checkpoint holds.
        write_jsonl(self.run_dir / METRICS, self.records)
        counts = self.num_samples.tolist()
        for logger in self.fabric.loggers:
            try:
                logger.log_hyperparams({"partition_class_counts": self.partition_summary,
                                        "partition_num_samples": counts, "malicious_clients": self.malicious})
            except NotImplementedError:  # Lightning's CSV logger keeps no hyperparameters
                pass
        if exp.output.progress:
            print(f"{exp.run_name}: {len(counts)} clients, {min(counts)}-{max(counts)} samples each "
                  f"(class counts in {self.run_dir / 'partition.json'}), malicious: {self.malicious}")

    def _progress_bar(self):
        from tqdm.auto import tqdm

        return tqdm(total=self.exp.federation.rounds, initial=self.start_round, desc=self.exp.run_name,
                    unit="round", dynamic_ncols=True)

    def summary(self, wall_time: float) -> dict:
        exp = self.exp
        return {
            "run": exp.run_name,
            "status": "finished",
            "attack": exp.attack.name,
            "defense": exp.defense.name,
            "dataset": exp.data.name,
            "seed": exp.seed,
            "final": final_numbers(self.records, exp.federation.final_rounds),
            "detection": summarise_detection([r["detection"] for r in self.records]),
            "rejected_updates": dict(Counter(reason for r in self.records for reason in r["rejected"].values())),
            "non_finite_aggregate_rounds": [r["round"] for r in self.records if r.get("non_finite_aggregate")],
            "rounds": len(self.records),
            "malicious_clients": self.malicious,
            "wall_time_s": wall_time,
            "mean_round_time_s": fmean(r["time"]["round"] for r in self.records) if self.records else None,
            "seeds": {"run": exp.seed, **seed_table(exp.seed)},
            "versions": versions(),
            "code": code_revision(),
            "device": describe_device(self.device),
            "world_size": self.world,
            "local_training": "cohort" if self.cohort else "sequential",
            "config": lossless(exp.config),  # inf and nan kept (as strings), to compare a rerun's with
        }


def run_experiment(exp: Experiment, fabric=None) -> dict:
    """Validate, set up and run one experiment; returns its summary."""
    return FederatedRun(exp, fabric).run()
