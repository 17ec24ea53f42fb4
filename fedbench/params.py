"""Which tensors of a model take part in aggregation, decided once for every defense.

Rule:
- The *update* a client sends is its trainable parameters (weights and biases, in
  ``named_parameters()`` order) after local training minus the global ones, flattened
  into one vector of length d. Every defense sees only these ``[n, d]`` updates.
- Buffers (BatchNorm running mean/var and ``num_batches_tracked``) are not part of the
  update: no defense can judge them. The new global buffers are the sample-count
  weighted mean of the buffers of the clients that neither the screening nor the
  defense excluded (integer buffers rounded). A round in which every client is
  excluded keeps the old buffers.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor


def trainable_parameters(model: nn.Module) -> list[Tensor]:
    """The parameters that local training moves and the update holds, in ``named_parameters()`` order."""
    return [p for p in model.parameters() if p.requires_grad]


class ParameterLayout:
    def __init__(self, model: nn.Module) -> None:
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        self.shapes = [p.shape for _, p in model.named_parameters() if p.requires_grad]
        self.numels = [p.numel() for _, p in model.named_parameters() if p.requires_grad]
        self.dim = sum(self.numels)
        self.buffer_names = [name for name, _ in model.named_buffers()]
        self.buffer_numels = [b.numel() for _, b in model.named_buffers()]
        self.buffer_is_int = [not b.is_floating_point() for _, b in model.named_buffers()]
        self.buffer_dim = sum(self.buffer_numels)

    def _params(self, model: nn.Module) -> list[Tensor]:
        return trainable_parameters(model)

    def flatten(self, model: nn.Module) -> Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self._params(model)])

    @torch.no_grad()
    def load(self, model: nn.Module, flat: Tensor) -> None:
        for p, chunk in zip(self._params(model), flat.split(self.numels)):
            p.copy_(chunk.view_as(p))

    def split(self, flat: Tensor) -> list[Tensor]:
        """Per-tensor views of a flat vector (or of each row of ``[n, d]``)."""
        return [chunk.view(*flat.shape[:-1], *shape) for chunk, shape in zip(flat.split(self.numels, -1), self.shapes)]

    def flatten_buffers(self, model: nn.Module) -> Tensor:
        buffers = [b.detach().reshape(-1).float() for _, b in model.named_buffers()]
        if not buffers:
            return torch.zeros(0, device=next(model.parameters()).device)
        return torch.cat(buffers)

    @torch.no_grad()
    def load_buffers(self, model: nn.Module, flat: Tensor) -> None:
        if not self.buffer_names:
            return
        for (_, b), chunk, is_int in zip(model.named_buffers(), flat.split(self.buffer_numels), self.buffer_is_int):
            b.copy_((chunk.round() if is_int else chunk).view_as(b).to(b.dtype))
