"""What every attack shares: who is malicious, when they attack, how updates are crafted,
and, for backdoors, batched on-device poisoning and the attack success rate.

Conventions (all attacks):
- Malicious clients: ``int(malicious_fraction * num_clients)`` of all clients (as the
  published SDFC/FDCR code rounds), chosen once per run: ``selection="last"`` takes the
  highest ids (the published code), ``"random"`` a seeded random set. The choice is
  recorded in the run summary.
- Schedule: a malicious client attacks in round r (0-based) when
  ``first_round <= r <= last_round`` and ``(r - first_round) % every == 0``; in other
  rounds it trains honestly on clean data.
- ``scale``: model replacement (Bagdasaryan et al., AISTATS 2020): an attacking client
  sends ``scale * update``; 1 is off. The paper's boost is ``scale = n / server_lr`` for n
  equally weighted clients under FedAvg: the aggregate step then carries the attacker's
  whole update, ``server_lr * (1/n) * (n / server_lr) * u = u`` (its model replaces the
  global one when the benign updates roughly cancel).
- ``adaptive``: the attacker knows the defense's client-side protocol and evades it
  (:class:`attacks.evasion.EvadingProtocol`); the defense only sees what clients report.

Hooks, at named points; the engine owns the order (``fedbench.engine``):
- every process, every round: :meth:`Attack.round_start` (the global model clients download);
- client side, on the process that trains the client, for attacking clients:
  :meth:`Attack.poison_plan` (which samples carry a trigger), :meth:`Attack.before_training`
  (may return an extra loss term), :meth:`Attack.step_hook` (runs after every optimizer
  step), :meth:`Attack.after_training`, :meth:`Attack.craft_update` (what the client
  sends); for every malicious client: :meth:`Attack.client_protocol` (what it runs of a
  defense's client-side protocol, e.g. SDFC's score);
- server side, omniscient, after the updates are gathered and before screening:
  :meth:`Attack.craft_round` sees every row of the round and replaces its own.

Backdoor conventions:
- A fixed subset of exactly ``round(poison_ratio * n_k)`` of a malicious client's n_k
  samples (seeded per client) carries the trigger and the ``target_label``
  (all-to-one). The trigger is stamped on the device after augmentation and
  normalisation, so it sits at the same place in every batch and in evaluation.
- A trigger is ``x' = (1 - alpha) * x + alpha * pattern`` with per-pixel ``alpha`` and
  ``pattern`` given in model-input (normalised) space. Patches have alpha in {0, 1};
  Blended has alpha = 0.2 everywhere. Because normalisation is affine per channel this
  equals blending in raw pixel space.
- ASR is always reported both ways (``fedbench.evaluation``): ``asr`` = share of
  triggered test images predicted as the target over test images whose true label is
  NOT the target (the headline), and ``asr_all`` = the same share over EVERY test image,
  as the published SDFC/FDCR code counts it (a failed backdoor then still shows about
  1/num_classes, the target class's share of the test set).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal

import torch
import torch.nn as nn
from torch import Tensor

from fedbench.data import ImagePipeline
from fedbench.registry import Registry
from fedbench.seeding import numpy_rng, torch_generator

if TYPE_CHECKING:
    from defenses.base import ClientHook

ATTACKS: Registry[type["Attack"]] = Registry("attack")


@dataclass
class AttackSetup:
    """What an attack learns about the run before training starts."""

    num_clients: int
    num_classes: int
    channels: int
    image_size: int
    pipeline: ImagePipeline
    device: torch.device
    seed: int
    clean_update: Callable[["ClientInfo"], Tensor] | None = None
    """``clean_update(client)``: the update the client would send if it trained honestly
    on its clean data this round (a separate training run from the global model, with its
    own seeded batches; the model is back at the global one afterwards). What an attacker
    can compute on its own device, e.g. to estimate a benign norm."""


@dataclass
class ClientInfo:
    """Who is training, passed to attack and defense hooks."""

    client_id: int
    round: int
    malicious: bool = False
    attacking: bool = False
    attacker_rank: int = -1


@dataclass
class ServerView:
    """What a server-side attack sees: the whole round after the gather, before screening
    (the omniscient attacker of the Byzantine literature). Every process holds every row,
    so the attack gives the same rows on 1 and N processes.

    Attributes:
        round: 0-based round index.
        updates: every selected client's update as sent, ``[n, d]`` (a copy: changing it
            changes nothing; only the rows :meth:`Attack.craft_round` returns are sent).
        own: bool ``[n]``, the rows of this round's attacking clients.
        client_ids: int64 ``[n]``.
        num_samples: int64 ``[n]``, the clients' sample counts.
        global_params: the global parameters the clients started from, ``[d]``.
        expected_malicious: the f every defense is told (expected attackers per round).
        generator: the attack's own random stream for this round, on the updates' device.
    """

    round: int
    updates: Tensor
    own: Tensor
    client_ids: Tensor
    num_samples: Tensor
    global_params: Tensor
    expected_malicious: int
    generator: torch.Generator

    @property
    def benign(self) -> Tensor:
        """The other clients' rows, ``[n - |own|, d]``."""
        return self.updates[~self.own]

    def reference(self, knowledge: str) -> Tensor:
        """The updates an attack estimates from: ``"omniscient"`` the other clients' rows,
        ``"own"`` the attackers' own (honest) rows."""
        return self.benign if knowledge == "omniscient" else self.updates[self.own]


Knowledge = Literal["omniscient", "own"]


def knowledge_problems(knowledge: str) -> list[tuple[str, object, str]]:
    """The check of a server-side attack's ``knowledge`` option."""
    if knowledge not in ("omniscient", "own"):
        return [("attack.knowledge", knowledge, "one of: omniscient, own")]
    return []


class Attack:
    """Base of all attacks. Subclasses override the hooks they need.

    Args:
        malicious_fraction: share of all clients that are malicious (papers: 0.3 and 0.2).
        selection: "last" (highest ids, as the published code) or "random" (seeded).
        first_round: first round (0-based) in which malicious clients attack.
        last_round: last round in which they attack; None = until the end.
        every: attack every k-th round from first_round; 1 = every round.
        scale: model-replacement factor applied to an attacking client's update; 1 = off.
        adaptive: the attacker evades the defense's client-side protocol: it skips any loss
            term the defense adds and reports what it computes on its clean samples only
            (:class:`attacks.evasion.EvadingProtocol`; against SDFC: no calibration, a clean Fisher score).
        adaptive_report: what an adaptive attacker reports: "clean" (the protocol's numbers
            on its clean samples) or "lowest" (every scalar upload replaced by
            ``lowest_report``: against SDFC the smallest score, hence the largest weight).
        lowest_report: the value an "lowest" adaptive attacker reports (SDFC scores are >= 0).
    """

    def __init__(
        self,
        malicious_fraction: float = 0.3,
        selection: Literal["last", "random"] = "last",
        first_round: int = 0,
        last_round: int | None = None,
        every: int = 1,
        scale: float = 1.0,
        adaptive: bool = False,
        adaptive_report: Literal["clean", "lowest"] = "clean",
        lowest_report: float = 0.0,
    ) -> None:
        self.malicious_fraction = malicious_fraction
        self.selection = selection
        self.first_round = first_round
        self.last_round = last_round
        self.every = every
        self.scale = scale
        self.adaptive = adaptive
        self.adaptive_report = adaptive_report
        self.lowest_report = lowest_report
        self.env: AttackSetup | None = None

    @property
    def name(self) -> str:
        return ATTACKS.name_of(type(self)) or type(self).__name__

    def problems(self) -> list[tuple[str, object, str]]:
        """Invalid fields as (field, value, what is allowed); checked before any training."""
        found = []
        if not 0.0 <= self.malicious_fraction < 1.0:
            found.append(("attack.malicious_fraction", self.malicious_fraction, "a fraction in [0, 1)"))
        if self.selection not in ("last", "random"):
            found.append(("attack.selection", self.selection, "one of: last, random"))
        if self.first_round < 0:
            found.append(("attack.first_round", self.first_round, "an integer >= 0"))
        if self.last_round is not None and self.last_round < self.first_round:
            found.append(("attack.last_round", self.last_round, f"None or an integer >= first_round ({self.first_round})"))
        if self.every < 1:
            found.append(("attack.every", self.every, "an integer >= 1"))
        if not (self.scale > 0 and self.scale < float("inf")):
            found.append(("attack.scale", self.scale, "a finite number > 0"))
        if self.adaptive_report not in ("clean", "lowest"):
            found.append(("attack.adaptive_report", self.adaptive_report, "one of: clean, lowest"))
        return found

    def setup(self, env: AttackSetup) -> None:
        self.env = env

    def num_malicious(self, num_clients: int) -> int:
        return int(num_clients * self.malicious_fraction)

    def malicious_clients(self, num_clients: int, seed: int) -> list[int]:
        count = self.num_malicious(num_clients)
        if count == 0:
            return []
        if self.selection == "last":
            return list(range(num_clients - count, num_clients))
        chosen = numpy_rng(seed, "malicious").choice(num_clients, size=count, replace=False)
        return sorted(int(c) for c in chosen)

    def is_active(self, round_index: int) -> bool:
        if round_index < self.first_round:
            return False
        if self.last_round is not None and round_index > self.last_round:
            return False
        return (round_index - self.first_round) % self.every == 0

    def round_start(self, round_index: int, global_params: Tensor) -> None:
        """Every process, at the start of every round, with the global model the clients
        will download (what any client, so any attacker, sees)."""

    def state_dict(self) -> dict:
        """What the attack remembers between rounds (part of checkpoints)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # ------------------------------------------------------------------ client side
    def before_training(self, client: ClientInfo, model: nn.Module) -> Callable[[], Tensor] | None:
        """An attacking client, global model loaded, before local training: may return an
        extra loss term added to every local step's loss. With ``train.cohort`` every
        client's hooks run before any client trains, each with its own model: keep state
        per client."""
        return None

    def step_hook(self, client: ClientInfo, model: nn.Module) -> Callable[[], None] | None:
        """An attacking client, before local training: may return a callable run after every
        optimizer step (a projection onto a norm ball, a coordinate mask)."""
        return None

    def after_training(self, client: ClientInfo, model: nn.Module) -> None:
        """An attacking client, trained model loaded, before its update is taken."""

    def client_protocol(self, client: ClientInfo, protocol: "ClientHook") -> "ClientHook":
        """What a malicious client (attacking this round or not) runs of the defense's
        client-side protocol: the defense's own (honest) unless the attack is ``adaptive``."""
        if self.adaptive:
            from attacks.evasion import EvadingProtocol

            lowest = self.lowest_report if self.adaptive_report == "lowest" else None
            return EvadingProtocol(protocol, report=lowest)
        return protocol

    def craft_update(self, update: Tensor, client: ClientInfo) -> Tensor:
        """The update an attacking client sends, from the one its local training produced."""
        return update * self.scale if self.scale != 1.0 else update

    # ------------------------------------------------------------------ server side
    def craft_round(self, view: ServerView) -> Tensor | None:
        """Rows replacing the attacking clients' updates, ``[own.sum(), d]`` in row order,
        or None to send them as they are. Called only in rounds with an attacking client;
        the engine writes the rows into the attackers' places, so no other row can change."""
        return None

    # Data poisoning; an attack that does not poison leaves training data alone.
    def poison_plan(self, client: ClientInfo, num_samples: int) -> "BatchPoisoning | None":
        """What an attacking client does to its training batches (None: nothing)."""
        return None


class BatchPoisoning:
    """Applied by the client to every training batch it builds, on the device."""

    def apply(self, images: Tensor, labels: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        """Poison the batch made of the client's samples ``index`` (already normalised).
        Each sample on its own: the samples given may be several batches' at once."""
        raise NotImplementedError


class PoisonPlan(BatchPoisoning):
    """Which of a client's samples carry the trigger, and which trigger parts."""

    def __init__(self, attack: "BackdoorAttack", mask: Tensor, parts: tuple[int, ...] | None) -> None:
        self.attack = attack
        self.mask = mask
        self.parts = parts

    def apply(self, images: Tensor, labels: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        """Poison the batch made of the client's samples ``index`` (already normalised)."""
        chosen = self.mask[index]
        stamped = self.attack.apply_trigger(images, self.parts)
        images = torch.where(chosen.view(-1, 1, 1, 1), stamped, images)
        labels = torch.where(chosen, torch.full_like(labels, self.attack.target_label), labels)
        return images, labels


def plain_backdoors() -> list[str]:
    """Registered backdoors that have a trigger of their own (not one borrowed from another
    backdoor, as neurotoxin and norm_bounded do)."""
    return [name for name in ATTACKS.names() if issubclass(ATTACKS.get(name), BackdoorAttack)
            and not ATTACKS.get(name).borrows_trigger]


def blend(images: Tensor, alpha: Tensor, pattern: Tensor) -> Tensor:
    """A trigger stamped on model-input ``images``: ``(1 - alpha) * x + alpha * pattern``."""
    return images * (1 - alpha) + alpha * pattern


class BackdoorAttack(Attack):
    """A trigger attack. Subclasses implement :meth:`build_trigger`.

    Args:
        poison_ratio: share of a malicious client's samples that carry the trigger (papers: 0.5).
        target_label: the class every triggered input should be classified as (papers: 2).
        **kwargs: the base Attack's arguments (malicious_fraction, selection, schedule, scale, adaptive).
    """

    num_parts: int = 1
    borrows_trigger: bool = False
    """True for attacks that stamp another registered backdoor's trigger (``trigger=name``)."""

    def __init__(
        self,
        poison_ratio: float = 0.5,
        target_label: int = 2,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.poison_ratio = poison_ratio
        self.target_label = target_label
        self._triggers: dict[tuple[int, ...] | None, tuple[Tensor, Tensor]] = {}

    def problems(self) -> list[tuple[str, object, str]]:
        found = super().problems()
        if not 0.0 < self.poison_ratio <= 1.0:
            found.append(("attack.poison_ratio", self.poison_ratio, "a fraction in (0, 1]"))
        if self.target_label < 0:
            found.append(("attack.target_label", self.target_label, "a class index >= 0"))
        return found

    def setup(self, env: AttackSetup) -> None:
        super().setup(env)
        if self.target_label >= env.num_classes:
            from fedbench.errors import config_error

            raise config_error("attack.target_label", self.target_label, f"a class index in [0, {env.num_classes - 1}]")
        self._triggers = {}
        self.trigger(None)  # builds the evaluation trigger now: a bad size fails before training

    def build_trigger(self, parts: tuple[int, ...] | None) -> tuple[Tensor, Tensor]:
        """``(alpha, pattern)``, each ``[C, H, W]``; pattern in model-input space.
        ``parts`` are DBA part indices, or None for the full trigger used in evaluation."""
        raise NotImplementedError

    def trigger(self, parts: tuple[int, ...] | None = None) -> tuple[Tensor, Tensor]:
        key = tuple(parts) if parts is not None and self.num_parts > 1 else None
        if key not in self._triggers:
            assert self.env is not None, "setup() first"
            alpha, pattern = self.build_trigger(key)
            self._triggers[key] = (alpha.to(self.env.device), pattern.to(self.env.device))
        return self._triggers[key]

    def apply_trigger(self, images: Tensor, parts: tuple[int, ...] | None = None) -> Tensor:
        alpha, pattern = self.trigger(parts)
        return blend(images, alpha, pattern)

    def parts_of(self, client: ClientInfo) -> tuple[int, ...] | None:
        """The trigger parts an attacker stamps (attacks with ``num_parts > 1``; None = the
        whole trigger). With A malicious clients and P parts, attacker rank i stamps part
        ``i mod P`` when A >= P, else every part j with ``j mod A = i``: every part is
        trained by at least one attacker for any A (with 3 attackers and 4 parts: {0, 3},
        {1}, {2}; with 1 attacker: the whole trigger). Parts are fixed per attacker over
        the run, so under client sampling a round whose selected attackers miss a part
        leaves it untrained that round (every part is still trained across rounds)."""
        if self.num_parts == 1:
            return None
        assert self.env is not None, "setup() first"
        attackers = max(self.num_malicious(self.env.num_clients), 1)
        if attackers >= self.num_parts:
            return (client.attacker_rank % self.num_parts,)
        return tuple(j for j in range(self.num_parts) if j % attackers == client.attacker_rank)

    def poison_plan(self, client: ClientInfo, num_samples: int) -> PoisonPlan | None:
        if not client.attacking:
            return None
        assert self.env is not None, "setup() first"
        count = int(round(self.poison_ratio * num_samples))
        generator = torch_generator(self.env.seed, "poison", client.client_id)
        chosen = torch.randperm(num_samples, generator=generator)[:count]
        mask = torch.zeros(num_samples, dtype=torch.bool)
        mask[chosen] = True
        return PoisonPlan(self, mask.to(self.env.device), self.parts_of(client))

    # Helpers for subclasses building triggers.
    def _blank(self) -> tuple[Tensor, Tensor]:
        env = self.env
        assert env is not None
        shape = (env.channels, env.image_size, env.image_size)
        return torch.zeros(shape), torch.zeros(shape)

    def _raw_to_input(self, raw: Tensor) -> Tensor:
        """Raw [0, 1] pixel values ``[C, H, W]`` -> model-input space."""
        env = self.env
        assert env is not None
        return env.pipeline.normalize(raw.to(env.pipeline.mean.device).unsqueeze(0)).squeeze(0).cpu()


class BorrowedTriggerBackdoor(BackdoorAttack):
    """A backdoor that stamps another registered backdoor's trigger (``trigger: NAME``,
    with that backdoor's default trigger options) and changes how it is trained."""

    borrows_trigger = True

    def __init__(self, trigger: str = "pixel_pattern", **kwargs) -> None:
        super().__init__(**kwargs)
        self.trigger_name = trigger
        self._source: BackdoorAttack | None = None

    def problems(self) -> list[tuple[str, object, str]]:
        found = super().problems()
        if self.trigger_name not in plain_backdoors():
            found.append(("attack.trigger", self.trigger_name, f"one of: {', '.join(plain_backdoors())}"))
        return found

    def setup(self, env: AttackSetup) -> None:
        self._source = ATTACKS.get(self.trigger_name)(target_label=self.target_label)
        self._source.setup(env)
        self.num_parts = self._source.num_parts
        super().setup(env)

    def build_trigger(self, parts: tuple[int, ...] | None) -> tuple[Tensor, Tensor]:
        assert self._source is not None, "setup() first"
        return self._source.build_trigger(parts)
