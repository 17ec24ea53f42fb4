"""A backdoor that keeps its update pointing where an honest one would, to keep FLTrust's
trust score (adaptive against FLTrust, Cao et al., NDSS 2021)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from torch import Tensor

from attacks.base import ATTACKS, BorrowedTriggerBackdoor, ClientInfo
from fedbench.params import trainable_parameters


@ATTACKS.register("cosine_constrained")
class CosineConstrained(BorrowedTriggerBackdoor):
    """A trigger backdoor whose local loss carries an extra term

        ``L = L_task(poisoned batch) + weight * (1 - cos(w - w_global, g_clean))``

    where ``w`` is the model being trained, ``w_global`` the round's global model and
    ``g_clean`` the update the attacker would send if it trained honestly on its own clean
    data this round (computed on its own device before the poisoned training; one extra
    local training per attacking client and round). FLTrust gives a client the trust score
    ``ReLU(cos(u_k, g_0))`` with ``g_0`` the server's root-data update, which the attacker
    does not know; its own clean update is its best estimate of that direction (the
    attacker knows only its own data, the global model and the defense's rule). The cosine
    is over every trainable parameter (the vector the defense sees). Why the ``||u||``
    factor: the cosine's own gradient grows as ``1 / ||u||``, so a bare ``weight * (1 -
    cos)`` throws a small early update far away (norms of 1e5 at weight 50 on the tiny test
    data); with the factor the pull toward ``g_clean`` has size ``weight * sin(angle)``
    whatever the update's scale. The term is zero on the first step (no update yet).

    Args:
        weight: the weight of the cosine term (default 1.0; 0 is the plain backdoor).
        trigger: the registered backdoor whose trigger is stamped (default pixel_pattern).
        **kwargs: BackdoorAttack arguments (poison_ratio, target_label, malicious_fraction, ...).
    """

    def __init__(self, weight: float = 1.0, trigger: str = "pixel_pattern", **kwargs) -> None:
        super().__init__(trigger=trigger, **kwargs)
        self.weight = weight

    def problems(self) -> list[tuple[str, object, str]]:
        found = super().problems()
        if not self.weight >= 0:
            found.append(("attack.weight", self.weight, "a number >= 0"))
        return found

    def before_training(self, client: ClientInfo, model: nn.Module) -> Callable[[], Tensor] | None:
        if self.weight == 0:
            return None
        assert self.env is not None and self.env.clean_update is not None, "the engine offers clean_update"
        honest = self.env.clean_update(client)
        params = trainable_parameters(model)
        starts = [p.detach().clone() for p in params]
        weight = self.weight

        def cosine_term() -> Tensor:
            update = torch.cat([(p - s).reshape(-1) for p, s in zip(params, starts)])
            if not update.any():  # the first step: the cosine of a zero update has no gradient
                return update.sum() * 0.0
            cosine = nn.functional.cosine_similarity(update, honest.to(update), dim=0, eps=1e-12)
            return weight * torch.linalg.vector_norm(update).detach() * (1.0 - cosine)

        return cosine_term
