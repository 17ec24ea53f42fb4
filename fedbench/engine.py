"""The federated round loop.

Each round, top to bottom (:meth:`FederatedRun.run_round`):
1. sample clients (all by default);
2. each selected client loads the global model and trains locally (a malicious client
   in an attack round poisons its batches and crafts its update); a defense's client
   hook may add a loss term and an upload;
3. the updates are screened (size, NaN/Inf, norm) and the defense aggregates the rest;
4. ``global += server_lr * aggregate``; buffers are averaged over non-excluded clients;
5. the global model is evaluated on the clean and the triggered test set;
6. the round's record is appended to ``metrics.jsonl`` and sent to the loggers.

With several processes (``--fabric.devices N``) client ``c`` trains on rank
``c % world_size``; updates are gathered with Fabric's collectives and every process
applies the same aggregation. Every random draw is keyed by (seed, stream, round,
client), so the result equals the single-process run.
"""

from __future__ import annotations

import platform
import resource
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean
from typing import Any, Literal

import torch
from torch import Tensor

from attacks.base import Attack, AttackSetup, ClientInfo
from defenses.base import Defense, DefenseSetup, RoundContext
from fedbench import __version__
from fedbench.client import LocalTrainConfig, LocalTrainer, iterate_batches, planned_steps
from fedbench.data import DataConfig, FederatedData, ImageSet, data_problems, load_federated_data
from fedbench.detection import detection_metrics, summarise_detection
from fedbench.errors import ConfigError
from fedbench.evaluation import evaluate
from fedbench.models import MODELS, ModelConfig, build_model
from fedbench.params import ParameterLayout
from fedbench.partition import PartitionConfig, class_counts, partition_clients
from fedbench.results import METRICS, SUMMARY, append_jsonl, read_jsonl, write_json_atomic, write_jsonl
from fedbench.screening import check_size, screen_updates
from fedbench.seeding import derive_seed, numpy_rng, seed_table, torch_generator
from fedbench.tracking import WandbConfig

Precision = Literal["32-true", "64-true", "bf16-mixed", "16-mixed", "bf16-true"]


@dataclass
class FederationConfig:
    """The federation and the server.

    Args:
        num_clients: clients in the federation (papers: 10).
        rounds: communication rounds T (papers: 50).
        client_fraction: share of clients selected per round (papers: all).
        server_lr: the server applies ``global += server_lr * aggregate`` for every defense.
        max_update_norm: None (default: FedAvg stays plain FedAvg) or a limit: updates with a
            larger L2 norm are rejected before aggregation. Updates with NaN/Inf or the wrong
            size are always rejected: a crash guard, not a defense (see fedbench.screening).
        eval_every: evaluate every k rounds (and always in the last ``final_rounds``).
        eval_batch_size: batch size of evaluation.
        final_rounds: the final numbers are the mean over the last this many evaluated rounds (papers: 5).
    """

    num_clients: int = 10
    rounds: int = 50
    client_fraction: float = 1.0
    server_lr: float = 1.0
    max_update_norm: float | None = None
    eval_every: int = 1
    eval_batch_size: int = 1024
    final_rounds: int = 5


@dataclass
class FabricConfig:
    """Lightning Fabric: where and in which precision clients train.

    Args:
        accelerator: cpu, cuda, mps, gpu or auto.
        devices: devices (processes) per node; clients of a round are split across them.
        num_nodes: nodes (with torchrun/SLURM).
        strategy: auto, or ddp for several processes (only collectives are used; models are not wrapped).
        precision: 32-true (default; bit-for-bit reproducible on CPU), bf16-mixed, 16-mixed, bf16-true, 64-true.
        cpu_threads: intra-op threads per process. CPU kernels split their sums by thread, so fp32 results
            are bit-identical only between runs with the same count; None keeps torch's default (all cores
            for one process; cores / processes when Fabric launches several).
    """

    accelerator: str = "auto"
    devices: int | str = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: Precision = "32-true"
    cpu_threads: int | None = None


@dataclass
class OutputConfig:
    """Where results go.

    Args:
        dir: parent folder of run folders.
        name: run folder name; None = ``<data>-<attack>-<defense>-s<seed>``.
        checkpoint_every: save the global model (and defense state) every k rounds; 0 = never.
        resume: continue from the run folder's last checkpoint if there is one.
        progress: show a progress bar.
    """

    dir: str = "runs"
    name: str | None = None
    checkpoint_every: int = 0
    resume: bool = False
    progress: bool = True


@dataclass
class Experiment:
    """Everything one run needs; what the CLI builds from its config."""

    attack: Attack
    defense: Defense
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: LocalTrainConfig = field(default_factory=LocalTrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    fabric: FabricConfig = field(default_factory=FabricConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    seed: int = 0
    config: dict | None = None

    @property
    def run_name(self) -> str:
        return self.output.name or f"{self.data.name}-{self.attack.name}-{self.defense.name}-s{self.seed}"

    @property
    def run_dir(self) -> Path:
        return Path(self.output.dir) / self.run_name

    @property
    def clients_per_round(self) -> int:
        return max(1, int(round(self.federation.client_fraction * self.federation.num_clients)))


def experiment_problems(exp: Experiment) -> list[tuple[str, object, str]]:
    """Every invalid field found without loading data."""
    found: list[tuple[str, object, str]] = []

    def need(ok: bool, field_name: str, value: object, allowed: str) -> None:
        if not ok:
            found.append((field_name, value, allowed))

    fed, train, data, part = exp.federation, exp.train, exp.data, exp.partition
    need(fed.num_clients >= 1, "federation.num_clients", fed.num_clients, "an integer >= 1")
    need(fed.rounds >= 1, "federation.rounds", fed.rounds, "an integer >= 1")
    need(0 < fed.client_fraction <= 1, "federation.client_fraction", fed.client_fraction, "a fraction in (0, 1]")
    need(fed.server_lr > 0, "federation.server_lr", fed.server_lr, "a number > 0")
    need(fed.max_update_norm is None or fed.max_update_norm > 0, "federation.max_update_norm", fed.max_update_norm,
         "None (no norm limit) or a norm > 0")
    need(fed.eval_every >= 1, "federation.eval_every", fed.eval_every, "an integer >= 1")
    need(fed.eval_batch_size >= 1, "federation.eval_batch_size", fed.eval_batch_size, "an integer >= 1")
    need(fed.final_rounds >= 1, "federation.final_rounds", fed.final_rounds, "an integer >= 1")
    need(train.lr > 0, "train.lr", train.lr, "a learning rate > 0")
    need(0 <= train.momentum < 1, "train.momentum", train.momentum, "a value in [0, 1)")
    need(train.weight_decay >= 0, "train.weight_decay", train.weight_decay, "a value >= 0")
    need(train.batch_size >= 1, "train.batch_size", train.batch_size, "an integer >= 1")
    need(train.local_epochs >= 1, "train.local_epochs", train.local_epochs, "an integer >= 1")
    need(train.local_steps is None or train.local_steps >= 1, "train.local_steps", train.local_steps,
         "None (use local_epochs) or an integer >= 1")
    need(0 < data.server_fraction < 1, "data.server_fraction", data.server_fraction, "a fraction in (0, 1)")
    for name in ("server_size", "train_subset", "test_subset"):
        value = getattr(data, name)
        need(value is None or value >= 1, f"data.{name}", value, "None (all) or an integer >= 1")
    need(data.image_size is None or data.image_size >= 8, "data.image_size", data.image_size, "None or >= 8")
    need(data.channels in (None, 1, 3), "data.channels", data.channels, "None, 1 or 3")
    need(data.crop_padding >= 0, "data.crop_padding", data.crop_padding, "an integer >= 0")
    need(part.beta > 0, "partition.beta", part.beta, "a concentration > 0")
    need(part.min_size >= 0, "partition.min_size", part.min_size, "an integer >= 0")
    need(part.shards_per_client >= 1, "partition.shards_per_client", part.shards_per_client, "an integer >= 1")
    need(exp.model.name in MODELS, "model.name", exp.model.name, f"one of: {', '.join(MODELS.names())}")
    need(exp.fabric.cpu_threads is None or exp.fabric.cpu_threads >= 1, "fabric.cpu_threads", exp.fabric.cpu_threads,
         "None (torch's default) or an integer >= 1")
    need(exp.output.checkpoint_every >= 0, "output.checkpoint_every", exp.output.checkpoint_every, "an integer >= 0")
    found.extend(exp.attack.problems())
    if exp.attack.num_malicious(fed.num_clients) >= fed.num_clients and fed.num_clients >= 1:
        found.append(("attack.malicious_fraction", exp.attack.malicious_fraction, "leaves at least one benign client"))
    if fed.num_clients >= 1 and 0 < fed.client_fraction <= 1:
        found.extend(exp.defense.problems(defense_setup(exp, layout=None)))
    found.extend(data_problems(data))
    return found


def expected_malicious(exp: Experiment) -> int:
    """Expected malicious clients among the clients selected in a round."""
    num_clients = exp.federation.num_clients
    return int(round(exp.attack.num_malicious(num_clients) * exp.clients_per_round / num_clients))


def defense_setup(exp: Experiment, layout, data: FederatedData | None = None, **kwargs) -> DefenseSetup:
    """What a defense is told; without ``data`` (validation before loading) server data is unknown."""
    needs = exp.defense.needs_server_data
    return DefenseSetup(
        num_clients=exp.federation.num_clients,
        clients_per_round=exp.clients_per_round,
        expected_malicious=expected_malicious(exp),
        layout=layout,
        server_data=data.server if (needs and data is not None) else None,
        seed=exp.seed,
        **kwargs,
    )


def validate(exp: Experiment) -> None:
    problems = experiment_problems(exp)
    if problems:
        raise ConfigError(problems)


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


def peak_memory_mb(device: torch.device) -> float:
    """GPU: the round's peak allocation. CPU: the process's peak resident memory so far."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def final_numbers(records: list[dict], final_rounds: int) -> dict[str, float | None]:
    """Each the mean over the last ``final_rounds`` evaluated rounds, as the SDFC/FDCR papers
    report: A (clean accuracy); ASR over non-target test images (the headline), R = 100 - ASR
    and V = (A + R) / 2; and the same over all test images (``ASR_all``, ``R_all``,
    ``V_all``: the published SDFC/FDCR code's count, what their tables' R means)."""
    evaluated = [r for r in records if r.get("clean_acc") is not None][-final_rounds:]
    numbers: dict[str, float | None] = dict.fromkeys(("A", "ASR", "R", "V", "ASR_all", "R_all", "V_all"))
    if not evaluated:
        return numbers
    accuracy = numbers["A"] = fmean(r["clean_acc"] for r in evaluated)
    for key, suffix in (("asr", ""), ("asr_all", "_all")):
        values = [r[key] for r in evaluated if r.get(key) is not None]
        if values:
            asr = fmean(values)
            numbers[f"ASR{suffix}"], numbers[f"R{suffix}"] = asr, 100.0 - asr
            numbers[f"V{suffix}"] = (accuracy + 100.0 - asr) / 2
    return numbers


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
        self.rank = fabric.global_rank
        self.world = fabric.world_size
        self.seed = exp.seed
        self.run_dir = exp.run_dir
        self.records: list[dict] = []
        self._progress = None
        self._setup()

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        exp, seed = self.exp, self.seed
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = False
        self.data: FederatedData = load_federated_data(exp.data, seed, self.device)
        pool = self.data.client_pool
        num_clients = exp.federation.num_clients
        self.parts = partition_clients(pool.labels, num_clients, exp.partition, seed)
        self.client_sets: list[ImageSet] = [pool.subset(p.to(self.device)) for p in self.parts]
        self.num_samples = torch.tensor([len(s) for s in self.client_sets], dtype=torch.int64)
        self.partition_summary = class_counts(pool.labels, self.parts, self.data.num_classes)

        pipeline = self.data.pipeline
        image_size = int(pool.images.shape[-1])
        torch.manual_seed(derive_seed(seed, "model_init"))
        model = build_model(exp.model.name, self.data.num_classes, pipeline.channels, image_size)
        model = self.fabric.to_device(model)
        if exp.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.layout = ParameterLayout(model)
        self.global_params = self.layout.flatten(model).clone()
        self.global_buffers = self.layout.flatten_buffers(model).clone()
        self.trainer = LocalTrainer(model, exp.train, pipeline, self.fabric)

        self.malicious = exp.attack.malicious_clients(num_clients, seed)
        self.attacker_rank = {cid: i for i, cid in enumerate(self.malicious)}
        exp.attack.setup(AttackSetup(num_clients, self.data.num_classes, pipeline.channels, image_size,
                                     pipeline, self.device, seed))

        defense = exp.defense
        env = defense_setup(exp, self.layout, self.data, device=self.device,
                            server_train=self.server_train if defense.needs_server_data else None)
        problems = defense.problems(env)
        if problems:
            raise ConfigError(problems)
        defense.setup(env)
        self.hook = defense.client_hook()
        self.start_round = 0
        if exp.output.resume:
            self._load_checkpoint()

    # ------------------------------------------------------------------ clients
    def sample_clients(self, round_index: int) -> list[int]:
        n, k = self.exp.federation.num_clients, self.exp.clients_per_round
        if k == n:
            return list(range(n))
        chosen = numpy_rng(self.seed, "sampling", round_index).choice(n, size=k, replace=False)
        return sorted(int(c) for c in chosen)

    def client_info(self, client_id: int, round_index: int) -> ClientInfo:
        malicious = client_id in self.attacker_rank
        return ClientInfo(
            client_id=client_id,
            round=round_index,
            malicious=malicious,
            attacking=malicious and self.exp.attack.is_active(round_index),
            attacker_rank=self.attacker_rank.get(client_id, -1),
            adaptive=malicious and self.exp.attack.adaptive,
        )

    def train_client(self, client: ClientInfo) -> dict[str, Any]:
        """Local training of one client from the global model; returns its upload."""
        data = self.client_sets[client.client_id]
        attack = self.exp.attack
        plan = attack.poison_plan(client, len(data))
        self.layout.load(self.model, self.global_params)
        self.layout.load_buffers(self.model, self.global_buffers)
        generator = torch_generator(self.seed, "train", client.round, client.client_id, device=self.device)
        local_batches, server_batches = self._hook_batches(client, data, plan)

        started = time.perf_counter()
        regularizer = None
        if self.hook is not None:
            regularizer = self.hook.before_training(client, self.model, local_batches, server_batches)
        prepared = time.perf_counter()
        result = self.trainer.train(data, generator, plan, regularizer)
        trained = time.perf_counter()
        uploads: dict[str, Tensor] = {}
        if self.hook is not None:
            uploads = self.hook.after_training(client, self.model, local_batches, server_batches)
        hooked = time.perf_counter()

        update = self.layout.flatten(self.model) - self.global_params
        if client.attacking:
            update = attack.craft_update(update, client)
        return {
            "update": update,
            "buffers": self.layout.flatten_buffers(self.model),
            "steps": result.steps,
            "loss": result.mean_loss,
            "uploads": uploads,
            "time_train": trained - prepared,
            "time_hook": (prepared - started) + (hooked - trained),
        }

    def _hook_batches(self, client: ClientInfo, data: ImageSet, plan):
        """Batch iterators a client hook may use, each call drawing the same seeded batches."""
        batch_size, pipeline = self.exp.train.batch_size, self.data.pipeline
        key = (self.seed, "train", client.round, client.client_id)

        prepare = self.trainer.prepare

        def local_batches(clean: bool = False):
            generator = torch_generator(*key, 1, device=self.device)
            batches = iterate_batches(data, pipeline, batch_size, generator, poison=None if clean else plan)
            return ((prepare(x), y) for x, y in batches)

        def server_batches():
            generator = torch_generator(*key, 2, device=self.device)
            return ((prepare(x), y) for x, y in iterate_batches(self.data.server, pipeline, batch_size, generator))

        return local_batches, server_batches if self.exp.defense.needs_server_data else None

    def server_train(self, params: Tensor, data: ImageSet, steps: int, round_index: int) -> Tensor:
        """Train a copy of the global model on server-held data (FLTrust's root set)."""
        self.layout.load(self.model, params)
        self.layout.load_buffers(self.model, self.global_buffers)
        generator = torch_generator(self.seed, "server", round_index, device=self.device)
        self.trainer.train(data, generator, max_steps=steps)
        return self.layout.flatten(self.model) - params

    # ------------------------------------------------------------------ gathering
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

    # ------------------------------------------------------------------ one round
    def run_round(self, round_index: int) -> dict:
        exp = self.exp
        round_started = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        selected = self.sample_clients(round_index)
        infos = [self.client_info(c, round_index) for c in selected]
        mine = [info for info in infos if info.client_id % self.world == self.rank]

        # 2. local training
        results = []
        for position, info in enumerate(mine, 1):
            if self._progress is not None:
                self._progress.set_postfix_str(f"client {position}/{len(mine)} (id {info.client_id})")
            results.append(self.train_client(info))
        size_faults = {info.client_id: check_size(r["update"], self.layout.dim) for info, r in zip(mine, results)}
        for info, r in zip(mine, results):
            if size_faults[info.client_id]:
                r["update"] = torch.zeros(self.layout.dim, device=self.device)
        updates = self._gather(selected, [r["update"] for r in results], (self.layout.dim,), torch.float32)
        buffers = self._gather(selected, [r["buffers"] for r in results], (self.layout.buffer_dim,),
                               torch.float32) if self.layout.buffer_dim else None
        scalars = self._gather(selected, [
            torch.tensor([r["steps"], r["loss"], r["time_train"], r["time_hook"],
                          1.0 if size_faults[i.client_id] else 0.0], device=self.device, dtype=torch.float64)
            for i, r in zip(mine, results)], (5,), torch.float64)
        upload_keys = self.hook.upload_keys if self.hook else ()
        uploads = {key: self._gather(selected, [r["uploads"][key].reshape(()).to(torch.float64) for r in results],
                                     (), torch.float64) for key in upload_keys}
        steps = scalars[:, 0].round().to(torch.int64)
        time_train, time_hook = float(scalars[:, 2].sum()), float(scalars[:, 3].sum())

        # 3. screening, then the defense
        aggregation_started = time.perf_counter()
        accepted, reasons = screen_updates(updates, exp.federation.max_update_norm)
        for j, wrong_size in enumerate(scalars[:, 4].tolist()):
            if wrong_size:
                accepted[j], reasons[j] = False, "wrong_size"
        n = len(selected)
        weights = torch.zeros(n, dtype=torch.float64)
        excluded = ~accepted.cpu()
        info: dict[str, Any] = {}
        client_ids = torch.tensor(selected, dtype=torch.int64)
        if accepted.any():
            kept = accepted.nonzero().squeeze(1)
            ctx = RoundContext(
                round=round_index,
                client_ids=client_ids[kept.cpu()],
                global_params=self.global_params,
                local_steps=steps[kept.cpu()],
                uploads={k: v[kept] for k, v in uploads.items()},
                generator=torch_generator(self.seed, "defense", round_index, device=self.device),
            )
            sample_counts = self.num_samples[client_ids[kept.cpu()]].to(self.device)
            aggregate = exp.defense.aggregate(updates[kept], sample_counts, ctx)
            if not torch.isfinite(aggregate.update).all():
                raise FloatingPointError(f"defense {exp.defense.name} returned a non-finite aggregate")
            weights[kept.cpu()] = aggregate.weights.detach().double().cpu()
            excluded[kept.cpu()] = aggregate.excluded.cpu()
            info = aggregate.info

            # 4. server step
            self.global_params = self.global_params + exp.federation.server_lr * aggregate.update
            if buffers is not None:
                self._update_buffers(buffers, ~excluded, client_ids)
        time_aggregation = time.perf_counter() - aggregation_started

        # 5. evaluation
        evaluation_started = time.perf_counter()
        metrics: dict[str, Any] = {"clean_acc": None, "clean_loss": None, "asr": None, "asr_all": None}
        if self._evaluate_this_round(round_index) and self.rank == 0:
            self.layout.load(self.model, self.global_params)
            self.layout.load_buffers(self.model, self.global_buffers)
            metrics = evaluate(self.model, self.data.test, self.data.pipeline, exp.attack, self.data.num_classes,
                               exp.federation.eval_batch_size, self.fabric.autocast, exp.train.channels_last)
        time_evaluation = time.perf_counter() - evaluation_started

        attacking = [i.attacking for i in infos]
        weight_list = weights.tolist()
        excluded_list = excluded.tolist()
        # Detection judges the defense: only the updates that passed the screening count.
        seen = accepted.cpu().tolist()
        detection = detection_metrics(*([v for v, s in zip(values, seen) if s]
                                        for values in (attacking, excluded_list, weight_list)))
        return {
            "round": round_index,
            **metrics,
            "train_loss": float(scalars[:, 1].mean()),
            "time": {
                "local_training": time_train,
                "client_hook": time_hook,
                "aggregation": time_aggregation,
                "evaluation": time_evaluation,
                "round": time.perf_counter() - round_started,
            },
            "peak_memory_mb": peak_memory_mb(self.device),
            "clients": selected,
            "malicious": [i.malicious for i in infos],
            "attacking": attacking,
            "local_steps": steps.tolist(),
            "update_norms": torch.linalg.vector_norm(torch.nan_to_num(updates, nan=0.0, posinf=0.0, neginf=0.0),
                                                     dim=1).tolist(),
            "weights": weight_list,
            "excluded": excluded_list,
            "rejected": {str(c): r for c, r in zip(selected, reasons) if r is not None},
            "detection": detection,
            "defense": info,
        }

    def _update_buffers(self, buffers: Tensor, kept: Tensor, client_ids: Tensor) -> None:
        """Sample-count weighted mean of non-excluded clients' buffers (see fedbench.params)."""
        if not kept.any():
            return
        counts = self.num_samples[client_ids[kept]].double()
        weights = (counts / counts.sum()).to(self.device, torch.float32)
        self.global_buffers = weights @ buffers[kept.to(self.device)]

    def _evaluate_this_round(self, round_index: int) -> bool:
        fed = self.exp.federation
        return (round_index + 1) % fed.eval_every == 0 or round_index >= fed.rounds - fed.final_rounds

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoints" / "last.pt"

    def _save_checkpoint(self, round_index: int) -> None:
        # Each process keeps the client-side state of the clients it trains, one file per
        # round until the main checkpoint of that round is on disk.
        self._save_atomic({"round": round_index, "hook": self.hook.state_dict() if self.hook else {}},
                          self._hook_checkpoint_path(self.rank, round_index))
        self.fabric.barrier()
        if self.rank == 0:
            self._save_atomic({
                "round": round_index,
                "world_size": self.world,
                "global_params": self.global_params.cpu(),
                "global_buffers": self.global_buffers.cpu(),
                "records": self.records,
                "defense": self.exp.defense.state_dict(),
            }, self.checkpoint_path)
        self.fabric.barrier()
        for old in self.checkpoint_path.parent.glob(f"clients.rank{self.rank}.round*.pt"):
            if old != self._hook_checkpoint_path(self.rank, round_index):
                old.unlink(missing_ok=True)

    def _hook_checkpoint_path(self, rank: int, round_index: int) -> Path:
        return self.checkpoint_path.with_name(f"clients.rank{rank}.round{round_index}.pt")

    @staticmethod
    def _save_atomic(state: dict, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(path)

    def _load_checkpoint(self) -> None:
        if not self.checkpoint_path.exists():
            return
        state = torch.load(self.checkpoint_path, map_location=self.device, weights_only=True)
        if state["world_size"] != self.world:
            raise ConfigError([("fabric.devices", self.world,
                                f"the checkpoint's {state['world_size']} processes to resume it")])
        clients = torch.load(self._hook_checkpoint_path(self.rank, int(state["round"])), map_location=self.device,
                             weights_only=True)
        self.global_params = state["global_params"].to(self.device)
        self.global_buffers = state["global_buffers"].to(self.device)
        self.records = list(state["records"])
        self.exp.defense.load_state_dict(state["defense"])
        if self.hook:
            self.hook.load_state_dict(clients["hook"])
        self.start_round = int(state["round"]) + 1

    # ------------------------------------------------------------------ the run
    def run(self) -> dict:
        exp = self.exp
        started = time.perf_counter()
        is_main = self.rank == 0
        metrics_path = self.run_dir / METRICS
        if is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.run_dir / "partition.json", {
                "scheme": exp.partition.scheme,
                "class_counts": self.partition_summary,
                "num_samples": self.num_samples.tolist(),
                "server_split": len(self.data.server),
                "malicious": self.malicious,
            })
            # Whatever a killed earlier attempt left is replaced by what the checkpoint holds.
            write_jsonl(metrics_path, self.records)
            counts = self.num_samples.tolist()
            for logger in self.fabric.loggers:
                logger.log_hyperparams({"partition_class_counts": self.partition_summary,
                                        "partition_num_samples": counts, "malicious_clients": self.malicious})
            if exp.output.progress:
                print(f"{exp.run_name}: {len(counts)} clients, {min(counts)}-{max(counts)} samples each "
                      f"(class counts in {self.run_dir / 'partition.json'}), malicious: {self.malicious}")

        progress = self._progress = self._progress_bar() if is_main and exp.output.progress else None
        for round_index in range(self.start_round, exp.federation.rounds):
            record = self.run_round(round_index)
            self.records.append(record)
            if is_main:
                append_jsonl(metrics_path, record)
                self.fabric.log_dict(flat_metrics(record), step=round_index)
            if exp.output.checkpoint_every and (round_index + 1) % exp.output.checkpoint_every == 0:
                self._save_checkpoint(round_index)  # every process: each holds its clients' state
            if progress is not None:
                progress.update(1)
                progress.set_postfix(acc=record["clean_acc"], asr=record["asr"])
        if progress is not None:
            progress.close()

        summary = self.summary(time.perf_counter() - started)
        if is_main:
            self.fabric.log_dict({f"final/{k}": v for k, v in summary["final"].items() if v is not None},
                                 step=exp.federation.rounds)
            write_json_atomic(self.run_dir / SUMMARY, summary)
        return summary

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
            "rounds": len(self.records),
            "malicious_clients": self.malicious,
            "wall_time_s": wall_time,
            "mean_round_time_s": fmean(r["time"]["round"] for r in self.records) if self.records else None,
            "seeds": {"run": exp.seed, **seed_table(exp.seed)},
            "versions": versions(),
            "device": describe_device(self.device),
            "world_size": self.world,
            "config": exp.config,
        }


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def flat_metrics(record: dict) -> dict[str, float]:
    """The scalar part of a round record, for loggers (W&B)."""
    flat: dict[str, float] = {}
    for key in ("clean_acc", "clean_loss", "asr", "asr_all", "train_loss", "peak_memory_mb"):
        if record.get(key) is not None:
            flat[key] = record[key]
    for key, value in record["time"].items():
        flat[f"time/{key}"] = value
    flat["rejected"] = len(record["rejected"])
    detection = record.get("detection")
    if detection:
        for key, value in detection.items():
            if value is not None:
                flat[f"detection/{key}"] = value
    return flat


def run_experiment(exp: Experiment, fabric=None) -> dict:
    """Validate, set up and run one experiment; returns its summary."""
    return FederatedRun(exp, fabric).run()
