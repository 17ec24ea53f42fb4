"""SDFC, Self-Driven Fisher Calibration (Huang et al., ECCV 2024), as the authors' code
builds it: the ``PrevAbsFedFish`` local objective with the ``ExpNegFishDiff`` server rule."""

from __future__ import annotations

from typing import Any, Callable, Literal

import torch
import torch.nn as nn
from torch import Tensor

from attacks.base import ClientInfo
from defenses.base import DEFENSES, Aggregate, Batches, ClientHook, Defense, DefenseSetup, QuadraticPull, \
    RoundContext, none_excluded, sample_weights
from fedbench.fisher import FisherEstimator, diagonal_fisher
from fedbench.params import trainable_parameters

SCORE = "sdfc_score"


def fisher_difference(
    model: nn.Module, local_batches: Batches, server_batches: Batches, estimator: FisherEstimator
) -> list[Tensor]:
    """``Delta = |F(w, D_local) - F(w, D_val)|`` per parameter tensor."""
    local = diagonal_fisher(model, local_batches(), estimator)
    validation = diagonal_fisher(model, server_batches(), estimator)
    return [(a - b).abs() for a, b in zip(local, validation)]


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
        defense = self.defense
        if defense.mode == "weights_only" or defense.calibration_lambda == 0:
            return None
        if not self.is_fresh(client):
            # First participation (round 0 in the paper) or stale state: Delta and theta_prev
            # of the current global model, which is loaded now.
            assert server_batches is not None
            delta = fisher_difference(model, local_batches, server_batches, defense.estimator)
            self._store(client, model, delta)
        delta, previous = self.delta[client.client_id], self.previous[client.client_id]
        params = trainable_parameters(model)
        return QuadraticPull(params, previous, delta, defense.calibration_lambda)

    def after_training(
        self, client: ClientInfo, model: nn.Module, local_batches: Batches, server_batches: Batches | None
    ) -> dict[str, Tensor]:
        assert server_batches is not None
        delta = fisher_difference(model, local_batches, server_batches, self.defense.estimator)
        self._store(client, model, delta)
        return {SCORE: difference_score(delta)}

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
