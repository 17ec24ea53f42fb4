"""FLTrust (Cao et al., NDSS 2021)."""

from __future__ import annotations

import torch
from torch import Tensor

from defenses.base import DEFENSES, Aggregate, Defense, DefenseSetup, RoundContext, ServerTraining
from fedbench.seeding import torch_generator


@DEFENSES.register("fltrust")
class FLTrust(Defense):
    """Trust bootstrapped from a small clean root set held by the server.

    Each round the server trains a copy of the global model on its root set with the
    clients' optimizer (SGD, same lr, momentum, weight decay, batch size) for the same
    number of local steps (``server_steps``; None = the median of this round's clients'
    step counts), giving the server update ``g_0``. Then
    ``trust_i = ReLU(cos(g_i, g_0))``, ``g_i' = g_i * ||g_0|| / ||g_i||`` and
    ``aggregate = sum_i trust_i g_i' / sum_i trust_i``. If every trust is 0 the global
    model does not move. A client with trust 0 is excluded; verdict weights are
    ``trust_i / sum_j trust_j``.

    The root set is ``root_size`` samples drawn once (seeded) from the server-held
    validation split, never from the test set. Where the clients train as a cohort, the
    engine trains ``g_0`` as one more row beside them (:meth:`server_training_plan`);
    the same update up to float rounding.

    Args:
        root_size: samples in the root set (paper: 100).
        server_steps: server optimizer steps per round; None = median of the clients'.
    """

    needs_server_data = True

    def __init__(self, root_size: int = 100, server_steps: int | None = None) -> None:
        super().__init__()
        self.root_size = root_size
        self.server_steps = server_steps
        self.root_set = None

    def problems(self, env: DefenseSetup) -> list[tuple[str, object, str]]:
        found = []
        if self.root_size < 1:
            found.append(("defense.root_size", self.root_size, "an integer >= 1"))
        elif env.server_data is not None and self.root_size > len(env.server_data):
            found.append(("defense.root_size", self.root_size,
                          f"at most the server split's {len(env.server_data)} samples"))
        if self.server_steps is not None and self.server_steps < 1:
            found.append(("defense.server_steps", self.server_steps, "None or an integer >= 1"))
        return found

    def setup(self, env: DefenseSetup) -> None:
        super().setup(env)
        assert env.server_data is not None and env.server_train is not None
        generator = torch_generator(env.seed, "defense", 0)
        chosen = torch.randperm(len(env.server_data), generator=generator)[: self.root_size]
        self.root_set = env.server_data.subset(chosen.to(env.server_data.labels.device))

    def steps_for(self, local_steps: Tensor) -> int:
        """The server's steps: ``server_steps``, else the lower median of the clients' steps."""
        return self.server_steps or int(local_steps.median())

    def server_training_plan(self, local_steps: Tensor) -> ServerTraining:
        return ServerTraining(self.root_set, self.steps_for(local_steps))

    def aggregate(self, updates: Tensor, num_samples: Tensor, ctx: RoundContext) -> Aggregate:
        assert self.env is not None and self.env.server_train is not None
        steps = self.steps_for(ctx.local_steps)
        server_update = self.env.server_train(ctx.global_params, self.root_set, steps, ctx.round).to(updates.dtype)
        return self.combine(updates, server_update, steps)

    @staticmethod
    def combine(updates: Tensor, server_update: Tensor, steps: int = 0) -> Aggregate:
        """The FLTrust rule given the server update ``g_0``."""
        tiny = torch.finfo(updates.dtype).tiny
        server_norm = torch.linalg.vector_norm(server_update)
        norms = torch.linalg.vector_norm(updates, dim=1)
        cosines = (updates @ server_update) / (norms * server_norm).clamp_min(tiny)
        trust = torch.relu(cosines)
        total = trust.sum()
        if total <= 0:
            weights = torch.zeros_like(trust)
            update = torch.zeros_like(server_update)
        else:
            weights = trust / total
            update = (weights * server_norm / norms.clamp_min(tiny)) @ updates
        info = {"cosines": cosines.tolist(), "server_norm": float(server_norm), "server_steps": steps}
        return Aggregate(update, weights, trust <= 0, info)
