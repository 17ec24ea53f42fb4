"""What one run is: the config sections of the engine and the :class:`Experiment` that
holds every section, the attack and the defense. Each section checks itself
(``problems()``); :func:`validate` collects every problem before any data is loaded."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from attacks.base import Attack
from defenses.base import Defense, DefenseSetup
from fedbench.client import LocalTrainConfig
from fedbench.data import DataConfig
from fedbench.errors import ConfigError, Problem, Problems
from fedbench.models import ModelConfig
from fedbench.partition import PartitionConfig
from fedbench.tracking import WandbConfig

if TYPE_CHECKING:
    from fedbench.data import FederatedData

Precision = Literal["32-true", "64-true", "bf16-mixed", "16-mixed", "bf16-true"]
TF32 = Literal["convolutions", "none", "all"]
# fabric.tf32 -> (cuDNN's convolutions may use TF32, torch's float32 matrix-product precision)
TF32_SWITCHES: dict[str, tuple[bool, str]] = {"convolutions": (True, "highest"), "none": (False, "highest"),
                                              "all": (True, "high")}


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

    def problems(self) -> list[Problem]:
        found = Problems()
        found.need(self.num_clients >= 1, "federation.num_clients", self.num_clients, "an integer >= 1")
        found.need(self.rounds >= 1, "federation.rounds", self.rounds, "an integer >= 1")
        found.need(0 < self.client_fraction <= 1, "federation.client_fraction", self.client_fraction,
                   "a fraction in (0, 1]")
        found.need(self.server_lr > 0, "federation.server_lr", self.server_lr, "a number > 0")
        found.need(self.max_update_norm is None or self.max_update_norm > 0, "federation.max_update_norm",
                   self.max_update_norm, "None (no norm limit) or a norm > 0")
        found.need(self.eval_every >= 1, "federation.eval_every", self.eval_every, "an integer >= 1")
        found.need(self.eval_batch_size >= 1, "federation.eval_batch_size", self.eval_batch_size, "an integer >= 1")
        found.need(self.final_rounds >= 1, "federation.final_rounds", self.final_rounds, "an integer >= 1")
        return found

    @property
    def clients_per_round(self) -> int:
        return max(1, int(round(self.client_fraction * self.num_clients)))


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
        tf32: on CUDA, which float32 work may run on TF32 tensor cores (inputs rounded to a 10-bit
            mantissa): convolutions (torch's default: cuDNN's convolutions in TF32, matrix products in
            full float32), none (both in full float32, as on a CPU), or all (both in TF32). The
            cohort's convolutions under train.cohort_convolution=matmul are matrix products: TF32 only
            with all. Process-wide, set as a run starts (cells packed in one process share their
            fabric settings; torch's matrix-product switch covers the process's oneDNN CPU products
            too); a CPU run leaves torch's switches as they are.
    """

    accelerator: str = "auto"
    devices: int | str = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: Precision = "32-true"
    cpu_threads: int | None = None
    tf32: TF32 = "convolutions"

    def problems(self) -> list[Problem]:
        found = Problems()
        found.need(self.cpu_threads is None or self.cpu_threads >= 1, "fabric.cpu_threads", self.cpu_threads,
                   "None (torch's default) or an integer >= 1")
        found.need(self.tf32 in TF32_SWITCHES, "fabric.tf32", self.tf32, ", ".join(TF32_SWITCHES))
        return found

    def apply_tf32(self, device: torch.device) -> None:
        """Sets torch's process-wide TF32 switches as ``tf32`` says, on a CUDA device only."""
        if device.type == "cuda":
            torch.backends.cudnn.allow_tf32, matmul_precision = TF32_SWITCHES[self.tf32]
            torch.set_float32_matmul_precision(matmul_precision)


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

    def problems(self) -> list[Problem]:
        found = Problems()
        found.need(self.checkpoint_every >= 0, "output.checkpoint_every", self.checkpoint_every, "an integer >= 0")
        return found


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
    logger: list[str] = field(default_factory=lambda: ["wandb"])
    config: dict | None = None

    @property
    def run_name(self) -> str:
        return self.output.name or f"{self.data.name}-{self.attack.name}-{self.defense.name}-s{self.seed}"

    @property
    def run_dir(self) -> Path:
        return Path(self.output.dir) / self.run_name

    @property
    def clients_per_round(self) -> int:
        return self.federation.clients_per_round

    def sections(self) -> list[object]:
        """The config sections (dataclasses that check themselves), in declaration order."""
        return [getattr(self, f.name) for f in fields(self) if hasattr(getattr(self, f.name), "problems")
                and f.name not in ("attack", "defense")]


def experiment_problems(exp: Experiment) -> list[Problem]:
    """Every invalid field found without loading data: each section's, the attack's, the
    defense's (when the federation is valid enough to describe to it)."""
    found: list[Problem] = []
    for section in exp.sections():
        found.extend(section.problems())
    fed = exp.federation
    found.extend(exp.attack.problems())
    if exp.attack.num_malicious(fed.num_clients) >= fed.num_clients and fed.num_clients >= 1:
        found.append(("attack.malicious_fraction", exp.attack.malicious_fraction, "leaves at least one benign client"))
    if fed.num_clients >= 1 and 0 < fed.client_fraction <= 1:
        found.extend(exp.defense.problems(defense_setup(exp, layout=None)))
    if (exp.train.cohort is True or exp.train.compile is not None) and exp.fabric.precision == "16-mixed":
        # one loss scaler for the whole cohort would skip every client's step when one overflows
        found.append(("fabric.precision", exp.fabric.precision,
                      "32-true, bf16-mixed, bf16-true or 64-true with train.cohort=true or train.compile "
                      "(16-mixed scales the loss of all clients together)"))
    return found


def validate(exp: Experiment) -> None:
    problems = experiment_problems(exp)
    if problems:
        raise ConfigError(problems)


def expected_malicious(exp: Experiment) -> int:
    """Expected malicious clients among the clients selected in a round."""
    num_clients = exp.federation.num_clients
    return int(round(exp.attack.num_malicious(num_clients) * exp.clients_per_round / num_clients))


def defense_setup(exp: Experiment, layout, data: "FederatedData | None" = None, **kwargs) -> DefenseSetup:
    """What a defense is told; without ``data`` (validation before loading) server data is unknown."""
    needs = exp.defense.needs_server_data
    return DefenseSetup(
        num_clients=exp.federation.num_clients,
        clients_per_round=exp.clients_per_round,
        expected_malicious=expected_malicious(exp),
        layout=layout,
        server_data=data.server if (needs and data is not None) else None,
        seed=exp.seed,
        server_lr=exp.federation.server_lr,
        **kwargs,
    )
