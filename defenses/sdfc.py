"""SDFC, Self-Driven Fisher Calibration (Huang et al., ECCV 2024), as the authors' code
builds it: the ``PrevAbsFedFish`` local objective with the ``ExpNegFishDiff`` server rule."""

from __future__ import annotations

from typing import Any, Callable, Literal

import torch
import torch.nn as nn
from torch import Tensor

from attacks.base import ClientInfo
from defenses.base import DEFENSES, Aggregate, Batches, ClientHook, Defense, DefenseSetup, HookCall, \
    QuadraticPull, RoundContext, none_excluded, sample_weights
from fedbench.fisher import FisherEstimator, cohort_fishers
from fedbench.params import trainable_parameters

SCORE = "sdfc_score"


def fisher_differences(models: list[nn.Module], local_batches: list[Batches], server_batches: list[Batches],
                       estimator: FisherEstimator) -> list[list[Tensor]]:
    """``Delta_k = |F(w_k, D_k) - F(w_k, D_val)|`` per parameter tensor, for each client's
    model ``w_k``; several clients' together (:func:`~fedbench.fisher.cohort_fishers`: one
    vectorised pass per batch step), one client as :func:`~fedbench.fisher.diagonal_fisher`."""
    local = cohort_fishers(models, [batches() for batches in local_batches], estimator)
    validation = cohort_fishers(models, [batches() for batches in server_batches], estimator)
    return [[(a - b).abs() for a, b in zip(mine, theirs)] for mine, theirs in zip(local, validation)]


def difference_score(delta: list[Tensor]) -> Tensor:
    """``s_k`` = mean over parameter tensors of the sum of Delta in that tensor."""
    return torch.stack([d.sum() for d in delta]).mean()


def exp_neg_weights(scores: Tensor) -> Tensor:
    """``softmax(-(s - min s) / (max s - min s))``. When every score is equal the
    min-max normalisation is undefined (the published code divides by zero); every
    client then gets the same weight."""
    low, high = scores.min(), scores.max()
    if high - low <= 0:
        return torch.full_like(scores, 1.0 / len(scores))
    normalised = (scores - low) / (high - low)
    return torch.softmax(-normalised, dim=0)


class SDFCClientHook(ClientHook):
    """Each client keeps Delta_k, theta_prev (its own model after its last local training)
    and the round they are from; the next local training adds
    ``lambda * sum_i Delta_k,i (theta_i - theta_prev,i)^2``.

    State older than the previous round (a client that sat out round r - 1 under client
    sampling) is stale: the global model has moved on without it, and anchoring to a model
    many rounds old would pull the client back to it. Such a client, like one at its first
    participation, computes Delta at the current global model and anchors to it.

    The engine calls the ``*_together`` methods (a cohort's clients at once, their Fisher
    matrices computed together; sequentially one client); ``before_training`` and
    ``after_training`` are their one-client forms, so a subclass overrides the former.
    """

    upload_keys = (SCORE,)

    def __init__(self, defense: "SDFC") -> None:
        self.defense = defense
        self.delta: dict[int, list[Tensor]] = {}
        self.previous: dict[int, list[Tensor]] = {}
        self.stored_round: dict[int, int] = {}

    def _store(self, client: ClientInfo, model: nn.Module, delta: list[Tensor]) -> None:
        self.delta[client.client_id] = [d.detach() for d in delta]
        self.previous[client.client_id] = [p.detach().clone() for p in trainable_parameters(model)]
        self.stored_round[client.client_id] = client.round

    def is_fresh(self, client: ClientInfo) -> bool:
        """Stored state exists and is from the previous round (or this one)."""
        return self.stored_round.get(client.client_id, -2) >= client.round - 1

    def before_training(
        self, client: ClientInfo, model: nn.Module, local_batches: Batches, server_batches: Batches | None
    ) -> Callable[[], Tensor] | None:
        return self.before_training_together([HookCall(client, model, local_batches, server_batches)])[0]

    def before_training_together(self, calls: list[HookCall]) -> list[Callable[[], Tensor] | None]:
        defense = self.defense
        if defense.mode == "weights_only" or defense.calibration_lambda == 0:
            return [None] * len(calls)
        # First participation (round 0 in the paper) or stale state: Delta and theta_prev of
        # the current global model, which is loaded now.
        self._compute_and_store([call for call in calls if not self.is_fresh(call.client)])
        return [QuadraticPull(trainable_parameters(call.model), self.previous[call.client.client_id],
                              self.delta[call.client.client_id], defense.calibration_lambda) for call in calls]

    def after_training(
        self, client: ClientInfo, model: nn.Module, local_batches: Batches, server_batches: Batches | None
    ) -> dict[str, Tensor]:
        return self.after_training_together([HookCall(client, model, local_batches, server_batches)])[0]

    def after_training_together(self, calls: list[HookCall]) -> list[dict[str, Tensor]]:
        return [{SCORE: difference_score(delta)} for delta in self._compute_and_store(calls)]

    def _compute_and_store(self, calls: list[HookCall]) -> list[list[Tensor]]:
        """Delta of each call's client at its model (the clients' Fisher matrices computed
        together), stored with the model as the client's anchor."""
        if not calls:
            return []
        assert all(call.server_batches is not None for call in calls)
        deltas = fisher_differences([call.model for call in calls], [call.local_batches for call in calls],
                                    [call.server_batches for call in calls], self.defense.estimator)
        for call, delta in zip(calls, deltas):
            self._store(call.client, call.model, delta)
        return deltas

    def state_dict(self) -> dict[str, Any]:
        return {
            "delta": {str(k): v for k, v in self.delta.items()},
            "previous": {str(k): v for k, v in self.previous.items()},
            "round": {str(k): v for k, v in self.stored_round.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.delta = {int(k): list(v) for k, v in state["delta"].items()}
        self.previous = {int(k): list(v) for k, v in state["previous"].items()}
        # Checkpoints written before rounds were stored: every client's state counts as stale.
        self.stored_round = {int(k): int(v) for k, v in state.get("round", {}).items()}


@DEFENSES.register("sdfc")
class SDFC(Defense):
    """Self-Driven Fisher Calibration.

    After local training, client k computes the diagonal Fisher of its model w_k on its
    own (possibly poisoned) training data and on the server-held validation split,
    ``Delta_k = |F(w_k, D_k) - F(w_k, D_val)|`` per parameter, and uploads
    ``s_k = mean over parameter tensors of sum(Delta_k in that tensor)``.

    Server: ``weight_k = softmax(-(s_k - min s) / (max s - min s))`` over this round's
    clients (equal weights when every s is equal); the new global model is the weighted
    mean of the client models, i.e. ``global + sum_k weight_k * update_k``. No client is
    excluded; a larger Delta means a smaller weight.

    Calibration: the next local training minimises
    ``CE + lambda * sum_i Delta_k,i * (theta_i - theta_prev,i)^2`` where theta_prev is
    the client's own model at the end of its previous local training and Delta_k was
    computed on it (at a client's first participation: on the starting model).

    With client sampling, a client whose stored Delta and theta_prev are older than the
    previous round recomputes them at the current global model (see
    :class:`SDFCClientHook`); with every client in every round (the paper) this never
    happens after round 0.

    BatchNorm buffers (running statistics) are averaged by the engine with sample-count
    weights for every defense; the authors' code averages the whole state_dict with the
    SDFC weights. The two differ only for models with BatchNorm (not simple_cnn). Client
    sampling is our extension: the authors' code trains every client every round.

    The defense sees only what clients report. Malicious clients follow the procedure
    honestly unless the attack is ``adaptive``: then the attack runs
    :class:`attacks.evasion.EvadingProtocol` instead (no calibration term, the score of
    the clean samples).

    Args:
        calibration_lambda: lambda of the calibration term (paper: 1.0).
        estimator: Fisher estimator (see fedbench.fisher). "published" (default): the
            square of the batch-mean gradient, exactly what the authors' ``fish_calculate``
            computes, so lambda = 1 means what it means in their runs. "empirical": the
            textbook mean of squared per-sample gradients, a variant (about 100x larger at
            initialisation, 2.5x after a few rounds, and it ranks clients differently).
        mode: "full" (SDFC), "calibration_only" (FedAvg weights), "weights_only" (no calibration term).
    """

    needs_server_data = True

    def __init__(
        self,
        calibration_lambda: float = 1.0,
        estimator: FisherEstimator = "published",
        mode: Literal["full", "calibration_only", "weights_only"] = "full",
    ) -> None:
        super().__init__()
        self.calibration_lambda = calibration_lambda
        self.estimator = estimator
        self.mode = mode
        self.hook = SDFCClientHook(self)

    def problems(self, env: DefenseSetup) -> list[tuple[str, object, str]]:
        found = []
        if self.calibration_lambda < 0:
            found.append(("defense.calibration_lambda", self.calibration_lambda, "a number >= 0"))
        if self.estimator not in ("empirical", "published"):
            found.append(("defense.estimator", self.estimator, "one of: empirical, published"))
        if self.mode not in ("full", "calibration_only", "weights_only"):
            found.append(("defense.mode", self.mode, "one of: full, calibration_only, weights_only"))
        return found

    def client_hook(self) -> ClientHook:
        return self.hook

    def aggregate(self, updates: Tensor, num_samples: Tensor, ctx: RoundContext) -> Aggregate:
        scores = ctx.uploads[SCORE].reshape(-1).to(torch.float64)
        if self.mode == "calibration_only":
            weights = sample_weights(num_samples, torch.float64)
        else:
            weights = exp_neg_weights(scores)
        weights = weights.to(updates.device, updates.dtype)
        info = {"scores": scores.tolist()}
        return Aggregate(weights @ updates, weights, none_excluded(len(updates), updates.device), info)
