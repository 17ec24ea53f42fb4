"""The one narrow entry point every defense implements, and what it is given.

A defense receives this round's client updates as one ``[n, d]`` tensor on the device
(update = local parameters minus global parameters, see ``fedbench.params`` for which
tensors count), the clients' sample counts and a :class:`RoundContext`; it returns an
:class:`Aggregate`: the aggregated update and a per-client verdict (the weight each
client got, whether it was excluded). The engine owns everything else: it screens
faulty updates before the defense sees them, applies the server learning rate
(``global += server_lr * aggregate.update``), aggregates BatchNorm buffers, and computes
detection metrics from the verdicts.

Defenses that need data on the server set ``needs_server_data = True`` and get the
server-held validation split in :class:`DefenseSetup`. Defenses that need work on the
clients return a :class:`ClientHook` from :meth:`Defense.client_hook`: the protocol every
client is asked to run. A malicious client runs what the attack makes of it
(``Attack.client_protocol``); the defense sees only what clients report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, NamedTuple

import torch
import torch.nn as nn
from torch import Tensor

from fedbench.registry import Registry

if TYPE_CHECKING:
    from attacks.base import ClientInfo
    from fedbench.data import ImageSet
    from fedbench.params import ParameterLayout

DEFENSES: Registry[type["Defense"]] = Registry("defense")

Batches = Callable[..., Iterator[tuple[Tensor, Tensor]]]
ServerTrain = Callable[[Tensor, "ImageSet", int, int], Tensor]


class ServerTraining(NamedTuple):
    """A ``server_train`` call a defense will make this round: on ``data``, ``steps`` steps."""

    data: "ImageSet"
    steps: int


@dataclass
class DefenseSetup:
    """Given once before training.

    Attributes:
        num_clients: clients in the federation.
        clients_per_round: clients selected each round (n of the [n, d] updates).
        expected_malicious: expected malicious clients among those selected.
        layout: which tensors the flat vectors hold, per tensor (names, shapes).
        server_data: the server-held validation split, when ``needs_server_data``.
        server_train: ``(global_params, data, steps, round) -> update``: trains a copy of
            the global model on ``data`` with the clients' optimizer for ``steps`` steps.
        seed: the run seed (derive streams with ``fedbench.seeding``).
        device: where updates live.
        server_lr: the engine's ``global += server_lr * update`` factor.
    """

    num_clients: int
    clients_per_round: int
    expected_malicious: int
    layout: "ParameterLayout"
    server_data: "ImageSet | None" = None
    server_train: ServerTrain | None = None
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    server_lr: float = 1.0


@dataclass
class RoundContext:
    """Given each round with the updates.

    Attributes:
        round: 0-based round index.
        client_ids: ids of the clients whose updates are the rows, int64 ``[n]``.
        global_params: the global parameters the clients started from, ``[d]``.
        local_steps: optimizer steps each client ran, int64 ``[n]``.
        uploads: what client hooks uploaded besides the update, each stacked to ``[n, ...]``.
        generator: this round's random stream for the defense (e.g. noise), on the device.
    """

    round: int
    client_ids: Tensor
    global_params: Tensor
    local_steps: Tensor
    uploads: dict[str, Tensor] = field(default_factory=dict)
    generator: torch.Generator | None = None


@dataclass
class Aggregate:
    """A defense's answer.

    Attributes:
        update: the aggregated update, ``[d]``; the engine applies ``server_lr`` to it.
        weights: the weight each client got in ``update``, ``[n]``, summing to 1
            (or to 0 when the model does not move). For coordinate-wise rules: the share
            of coordinates the client's value entered the aggregate, normalised.
        excluded: clients the defense rejected as a whole, bool ``[n]``.
        info: extra per-round numbers worth logging (e.g. scores), JSON-friendly.
    """

    update: Tensor
    weights: Tensor
    excluded: Tensor
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class FinalView:
    """Given once after the last round to :meth:`Defense.final_evaluation`.

    Attributes:
        global_params: the final global parameters, ``[d]``.
        predict: ``(params, count) -> (clean, triggered)``: the predicted labels of the
            model with ``params`` (the global buffers) on the first ``count`` test images,
            int64 ``[count]``, and on the same images with the attack's trigger (None for
            attacks without one).
        labels: the true labels of the test images, int64 ``[N]`` (slice the first ``count``).
        target_label: the backdoor's target class, or None.
        num_classes: classes of the task.
        generator: the defense's random stream for the final evaluation, on the device.
    """

    global_params: Tensor
    predict: Callable[[Tensor, int], "tuple[Tensor, Tensor | None]"]
    labels: Tensor
    target_label: int | None
    num_classes: int
    generator: torch.Generator


@dataclass
class QuadraticPull:
    """An extra loss term that pulls parameters towards an anchor, coordinate by coordinate:
    ``weight * sum_i (params_i - anchor_i)^2 * scale_i`` (summed over every coordinate of
    every tensor, in tensor order). It is a callable like any extra loss term; its form lets
    a cohort (``train.cohort``) compute it for every client in one vectorised pass when
    ``params`` are the client model's trainable parameters in order."""

    params: list[Tensor]
    anchor: list[Tensor]
    scale: list[Tensor]
    weight: float

    def __call__(self) -> Tensor:
        return self.weight * sum(((p - q).pow(2) * d).sum() for p, q, d in zip(self.params, self.anchor, self.scale))


class HookCall(NamedTuple):
    """The arguments of one client's :meth:`ClientHook.before_training` (or ``after_training``)."""

    client: "ClientInfo"
    model: nn.Module
    local_batches: Batches
    server_batches: Batches | None


class ClientHook:
    """Client-side work a defense asks for. Methods run on the client, around local training.

    ``local_batches(clean=False)`` iterates the client's own training data as it trains on
    it (poisoned when it attacks; ``clean=True`` leaves the trigger out);
    ``server_batches()`` iterates the server-held validation split when the defense
    declared ``needs_server_data`` (else it is None). State a real client would keep
    between rounds (e.g. its previous model) lives in the hook, keyed by client id;
    :meth:`state_dict` makes it part of checkpoints. With ``train.cohort`` every selected
    client's :meth:`before_training` runs before any of them trains (sequentially: right
    before its own training), each on its own copy of the model: keep state per client.
    The engine calls :meth:`before_training_together` and :meth:`after_training_together`
    with every client of a cohort that runs this hook (sequentially: with one client).
    """

    upload_keys: tuple[str, ...] = ()
    """Names of the uploads :meth:`after_training` returns (every client, every round)."""

    def upload_shape(self, key: str, dim: int) -> tuple[int, ...]:
        """Per-client shape of upload ``key``: ``()`` for a scalar (default, gathered in
        float64), ``(dim,)`` for a vector over the d parameters (gathered in float32)."""
        return ()

    def before_training(
        self, client: "ClientInfo", model: nn.Module, local_batches: Batches, server_batches: Batches | None
    ) -> Callable[[], Tensor] | None:
        """Called with the global model loaded; may return an extra loss term that is
        added to every local step's loss (a :class:`QuadraticPull` where it has that form:
        a cohort then computes it for all its clients at once)."""
        return None

    def before_training_together(self, calls: list[HookCall]) -> list[Callable[[], Tensor] | None]:
        """:meth:`before_training` of several clients (those that run this hook, each on its
        own model: a cohort's, or one client alone): one after another here; a hook whose
        work vectorises across clients overrides this to return the same terms from one pass."""
        return [self.before_training(*call) for call in calls]

    def after_training(
        self, client: "ClientInfo", model: nn.Module, local_batches: Batches, server_batches: Batches | None
    ) -> dict[str, Tensor]:
        """Called with the trained model; returns the scalar uploads named in ``upload_keys``."""
        return {}

    def after_training_together(self, calls: list[HookCall]) -> list[dict[str, Tensor]]:
        """:meth:`after_training` of several clients (a cohort's, or one client alone), each on
        its own model: one after another here; a hook whose work vectorises across clients
        (SDFC's Fisher) overrides this to return the same uploads from one pass. The engine
        calls the ``*_together`` methods only."""
        return [self.after_training(*call) for call in calls]

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class Defense:
    """Base of all defenses: a small class whose docstring states its formula."""

    needs_server_data: ClassVar[bool] = False

    def __init__(self) -> None:
        self.env: DefenseSetup | None = None

    @property
    def name(self) -> str:
        return DEFENSES.name_of(type(self)) or type(self).__name__

    def problems(self, env: DefenseSetup) -> list[tuple[str, object, str]]:
        """Invalid fields as (field, value, what is allowed), checked before any training."""
        return []

    def setup(self, env: DefenseSetup) -> None:
        self.env = env

    def client_hook(self) -> ClientHook | None:
        return None

    def aggregate(self, updates: Tensor, num_samples: Tensor, ctx: RoundContext) -> Aggregate:
        raise NotImplementedError

    def server_training_plan(self, local_steps: Tensor) -> ServerTraining | None:
        """The ``env.server_train`` call :meth:`aggregate` will make (from the round's global
        parameters, in this round) if its updates' clients ran ``local_steps``; None if it
        will make none (the default). The engine may train it beforehand, together with the
        clients (a cohort's extra row), and answer that call with the result; a call it did
        not foresee trains then."""
        return None

    def final_evaluation(self, view: FinalView) -> dict[str, float | None]:
        """Numbers the defense adds to the run's final numbers after the last round (e.g.
        CRFL's smoothed and certified accuracy); none by default."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def assumed_malicious(configured: int | None, env: DefenseSetup | None) -> int:
    """The f a defense assumes: the configured one, else the expected number of attackers
    among the selected clients (the same oracle knowledge for every defense)."""
    if configured is not None:
        return configured
    return env.expected_malicious if env is not None else 0


def sample_weights(num_samples: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """n_k / sum(n): FedAvg's weights."""
    counts = num_samples.to(dtype)
    return counts / counts.sum()


def none_excluded(n: int, device: torch.device) -> Tensor:
    return torch.zeros(n, dtype=torch.bool, device=device)
