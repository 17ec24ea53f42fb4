"""CRFL (Xie, Chen, Chen and Li, ICML 2021): clip and perturb the global model, certify by
parameter smoothing."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from defenses.base import DEFENSES, Aggregate, Defense, DefenseSetup, FinalView, RoundContext, none_excluded, sample_weights


@DEFENSES.register("crfl")
class CRFL(Defense):
    """Training (every round t = 1, 2, ..., T; the engine's round index + 1):

        ``w' = w_{t-1} + sum_k (n_k / N) u_k``                      (FedAvg)
        ``w_t = w' * min(1, rho_t / ||w'||_2) + N(0, sigma^2 I)``   (clip the MODEL, then perturb)
        ``rho_t = rho_0 + growth * t``

    ``||.||`` is over every trainable parameter (BatchNorm buffers are the engine's, see
    ``fedbench.params``). The paper's code clips with ``rho_t = min(0.1 t + 2, 15)`` for its
    MNIST logistic regression, whose initial norm is about 2; a bound of 2 would crush a
    CNN, so ``rho_0`` defaults to the norm of the initial global model (measured in the
    first round, kept as state) and the growth to the paper's 0.1 per round. sigma = 0.01
    (the paper's MNIST and EMNIST value). The noise comes from the round's defense stream.
    The aggregate returned is ``w_t - w_{t-1}``, so the engine's server learning rate must
    be 1 (checked). Difference from the published code: it evaluates each round's model
    before adding that round's noise; here the evaluated global model carries it.

    Final evaluation (parameter smoothing, the paper's certification): ``M`` noisy copies
    ``w_T + N(0, sigma_test^2 I)`` (sigma_test = sigma by default, as in the paper's
    configs) vote on the first ``certify_samples`` test images; the smoothed label is the
    most voted one (ties: the lowest class index). With Hoeffding's bound
    ``e = sqrt(ln(1/alpha) / (2M))`` (as the paper's code), ``p_A = p^_A - e`` and ``p_B =
    p^_B + e`` for the top two vote shares. The paper's certified radius is
    ``sqrt(-ln(1 - (sqrt(p_A) - sqrt(p_B))^2) sigma^2 / D)`` with D from the attack's
    strength and a Lipschitz constant of a linear model; it is positive exactly when ``p_A
    > p_B``. A CNN has no such constant, so we report the radius-free part only:

    - ``smoothed_A``: the smoothed label equals the true label (%);
    - ``certified_A``: it does and ``p_A > p_B`` (certified at some radius > 0, %);
    - ``smoothed_ASR`` / ``smoothed_ASR_all``: the smoothed label of the triggered image is
      the target, over non-target images / over all images (%; None without a trigger).

    The plain model's A/ASR are the run's usual numbers. The paper uses M = 1000, alpha =
    0.001 and 1,632 test images (51 batches of 32); ``certify_samples`` defaults to 1,000.

    Args:
        sigma: std of the training noise (0.01).
        clip_start: rho_0, or None for the norm of the initial global model.
        clip_growth: the bound's growth per round (0.1).
        smoothing_copies: M (1000).
        smoothing_sigma: std of the smoothing noise, None for ``sigma``.
        certify_samples: test images certified (1000).
        alpha: the confidence of Hoeffding's bound (0.001).
    """

    def __init__(self, sigma: float = 0.01, clip_start: float | None = None, clip_growth: float = 0.1,
                 smoothing_copies: int = 1000, smoothing_sigma: float | None = None,
                 certify_samples: int = 1000, alpha: float = 0.001) -> None:
        super().__init__()
        self.sigma = sigma
        self.clip_start = clip_start
        self.clip_growth = clip_growth
        self.smoothing_copies = smoothing_copies
        self.smoothing_sigma = smoothing_sigma
        self.certify_samples = certify_samples
        self.alpha = alpha
        self.initial_norm: float | None = None

    def problems(self, env: DefenseSetup) -> list[tuple[str, object, str]]:
        checks = [
            (self.sigma >= 0, "defense.sigma", self.sigma, "a number >= 0"),
            (self.clip_start is None or self.clip_start > 0, "defense.clip_start", self.clip_start,
             "None (the initial model's norm) or a number > 0"),
            (self.clip_growth >= 0, "defense.clip_growth", self.clip_growth, "a number >= 0"),
            (self.smoothing_copies >= 1, "defense.smoothing_copies", self.smoothing_copies, "an integer >= 1"),
            (self.smoothing_sigma is None or self.smoothing_sigma >= 0, "defense.smoothing_sigma",
             self.smoothing_sigma, "None (= sigma) or a number >= 0"),
            (self.certify_samples >= 1, "defense.certify_samples", self.certify_samples, "an integer >= 1"),
            (0 < self.alpha < 1, "defense.alpha", self.alpha, "a number in (0, 1)"),
            (env.server_lr == 1, "federation.server_lr", env.server_lr, "1 with defense crfl (it sets the model)"),
        ]
        return [(name, value, allowed) for ok, name, value, allowed in checks if not ok]

    def bound(self, round_index: int) -> float:
        """rho_t for the engine's 0-based ``round_index`` (t = round_index + 1)."""
        start = self.clip_start if self.clip_start is not None else self.initial_norm
        assert start is not None, "the initial norm is measured in the first aggregate"
        return start + self.clip_growth * (round_index + 1)

    def aggregate(self, updates: Tensor, num_samples: Tensor, ctx: RoundContext) -> Aggregate:
        if self.initial_norm is None:
            self.initial_norm = float(torch.linalg.vector_norm(ctx.global_params.double()))
        weights = sample_weights(num_samples).to(updates.device, updates.dtype)
        model = ctx.global_params + weights @ updates
        rho = self.bound(ctx.round)
        norm = float(torch.linalg.vector_norm(model.double()))
        if norm > rho:
            model = model * (rho / norm)
        if self.sigma > 0:
            model = model + self.sigma * torch.randn(model.shape, generator=ctx.generator,
                                                     device=model.device, dtype=model.dtype)
        info = {"clip_bound": rho, "model_norm": norm, "clipped": norm > rho}
        return Aggregate(model - ctx.global_params, weights, none_excluded(len(updates), updates.device), info)

    def final_evaluation(self, view: FinalView) -> dict[str, float | None]:
        count = min(self.certify_samples, len(view.labels))
        labels = view.labels[:count]
        sigma = self.sigma if self.smoothing_sigma is None else self.smoothing_sigma
        clean_votes = torch.zeros(count, view.num_classes, dtype=torch.long, device=labels.device)
        triggered_votes = torch.zeros_like(clean_votes)
        triggered_seen = False
        for _ in range(self.smoothing_copies):
            noise = torch.randn(view.global_params.shape, generator=view.generator,
                                device=view.global_params.device, dtype=view.global_params.dtype)
            clean, triggered = view.predict(view.global_params + sigma * noise, count)
            clean_votes[torch.arange(count), clean.to(labels.device)] += 1
            if triggered is not None:
                triggered_seen = True
                triggered_votes[torch.arange(count), triggered.to(labels.device)] += 1
        numbers = self._certify(clean_votes, labels)
        numbers.update(self._smoothed_asr(triggered_votes if triggered_seen else None, labels, view.target_label))
        return numbers

    def _certify(self, votes: Tensor, labels: Tensor) -> dict[str, float | None]:
        """smoothed_A and certified_A (Hoeffding-bounded top two vote shares)."""
        top = votes.argmax(dim=1)  # ties: the lowest class index
        rows = torch.arange(len(votes), device=votes.device)
        runner_up = votes.clone()
        runner_up[rows, top] = -1
        share_a = votes[rows, top].double() / self.smoothing_copies
        share_b = runner_up.max(dim=1).values.clamp_min(0).double() / self.smoothing_copies
        margin = math.sqrt(math.log(1 / self.alpha) / (2 * self.smoothing_copies))
        correct = top == labels
        certified = correct & (share_a - margin > share_b + margin)
        return {"smoothed_A": 100.0 * float(correct.double().mean()),
                "certified_A": 100.0 * float(certified.double().mean())}

    @staticmethod
    def _smoothed_asr(votes: Tensor | None, labels: Tensor, target: int | None) -> dict[str, float | None]:
        if votes is None or target is None:
            return {"smoothed_ASR": None, "smoothed_ASR_all": None}
        hit = votes.argmax(dim=1) == target
        non_target = labels != target
        return {"smoothed_ASR": 100.0 * float(hit[non_target].double().mean()) if non_target.any() else None,
                "smoothed_ASR_all": 100.0 * float(hit.double().mean())}

    def state_dict(self) -> dict[str, Any]:
        return {} if self.initial_norm is None else {"initial_norm": self.initial_norm}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.initial_norm = state.get("initial_norm")
