"""Min-Max (Shejwalkar and Houmansadr, NDSS 2021, "Manipulating the Byzantine")."""

from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import Tensor

from attacks.base import ATTACKS, Attack, Knowledge, ServerView, knowledge_problems

Perturbation = Literal["unit_vec", "std", "sign"]


def perturbation(reference: Tensor, kind: str) -> Tensor:
    """The paper's nabla_p: ``-mean/||mean||`` (unit_vec), ``-std`` (std, Bessel-corrected)
    or ``-sign(mean)`` (sign) of the reference updates."""
    mean = reference.mean(dim=0)
    if kind == "unit_vec":
        return -mean / mean.norm().clamp_min(1e-12)
    if kind == "std":
        return -reference.std(dim=0)
    return -torch.sign(mean)


def largest_gamma(accept: Callable[[float], bool], gamma_init: float = 10.0, tolerance: float = 1e-5) -> float:
    """The authors' search for the largest gamma with ``accept(gamma)``: start at
    ``gamma_init``, step ``gamma_init / 2``; after each test move up (accepted) or down by
    the step and halve it, until the last accepted gamma and the current one differ by at
    most ``tolerance``. Returns the last accepted gamma (0 if none was); it stays below
    ``2 * gamma_init`` (the steps up sum to gamma_init)."""
    gamma, step, accepted = gamma_init, gamma_init / 2, 0.0
    while abs(accepted - gamma) > tolerance:
        if accept(gamma):
            accepted = gamma
            gamma += step
        else:
            gamma -= step
        step /= 2
    return accepted


def squared_distances(points: Tensor, to: Tensor) -> Tensor:
    """``||points_i - to_j||^2`` in float64, ``[len(points), len(to)]``."""
    return torch.cdist(points.double(), to.double()).pow(2)


class OptimisedPerturbation(Attack):
    """Shared by min_max and min_sum: ``malicious = mean + gamma * nabla_p`` with gamma the
    largest the search accepts under :meth:`accepts`. Every attacking client sends it.

    Knowledge: ``"omniscient"`` (default, the paper's AGR-agnostic full-knowledge model):
    the reference updates are the other clients' rows of this round; ``"own"`` (partial
    knowledge): the attackers' own honest updates. Untargeted: ASR is not measured.

    Args:
        perturbation: unit_vec, std (default) or sign.
        gamma_init: the search's starting gamma (the authors' code: 10).
        tolerance: the search stops when the step is below this (the authors' code: 1e-5).
        knowledge: "omniscient" or "own".
        **kwargs: the base Attack's arguments (malicious_fraction, selection, schedule).
    """

    def __init__(self, perturbation: Perturbation = "std", gamma_init: float = 10.0, tolerance: float = 1e-5,
                 knowledge: Knowledge = "omniscient", **kwargs) -> None:
        super().__init__(**kwargs)
        self.perturbation = perturbation
        self.gamma_init = gamma_init
        self.tolerance = tolerance
        self.knowledge = knowledge

    def problems(self) -> list[tuple[str, object, str]]:
        found = super().problems()
        if self.perturbation not in ("unit_vec", "std", "sign"):
            found.append(("attack.perturbation", self.perturbation, "one of: unit_vec, std, sign"))
        if not self.gamma_init > 0:
            found.append(("attack.gamma_init", self.gamma_init, "a number > 0"))
        if not 0 < self.tolerance < self.gamma_init:
            found.append(("attack.tolerance", self.tolerance, "a number in (0, gamma_init)"))
        found.extend(knowledge_problems(self.knowledge))
        return found

    def accepts(self, candidate: Tensor, reference: Tensor) -> bool:
        raise NotImplementedError

    def craft_round(self, view: ServerView) -> Tensor | None:
        reference = view.reference(self.knowledge)
        if len(reference) < 2:
            return None
        mean, direction = reference.mean(dim=0), perturbation(reference, self.perturbation)
        gamma = largest_gamma(lambda g: self.accepts(mean + g * direction, reference), self.gamma_init,
                              self.tolerance)
        return (mean + gamma * direction).expand(int(view.own.sum()), -1).clone()


@ATTACKS.register("min_max")
class MinMax(OptimisedPerturbation):
    """Min-Max: the largest gamma with ``max_i ||m - g_i|| <= max_{i,j} ||g_i - g_j||`` over
    the reference updates g: the malicious update is no farther from any of them than
    they are from each other. Distances in float64."""

    def accepts(self, candidate: Tensor, reference: Tensor) -> bool:
        spread = squared_distances(reference, reference).max()
        return bool(squared_distances(candidate.unsqueeze(0), reference).max() <= spread)
