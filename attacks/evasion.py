"""The adaptive attacker's side of a defense's client-side protocol (``attack.adaptive``).

A client-side defense (SDFC) asks every client to add a loss term during local training
and to report a number computed on its training data. An attacker that knows the
protocol follows neither honestly: it trains without the term and computes the report
on its clean samples only, so that the report looks like a benign client's. The defense
sees only the report; the behaviour lives here, with the attack, not in the defense.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn
from torch import Tensor

from attacks.base import ClientInfo
from defenses.base import Batches, ClientHook


class EvadingProtocol(ClientHook):
    """Wraps the defense's honest client hook for one malicious client.

    - ``before_training``: no extra loss term (against SDFC: no Fisher calibration, so the
      malicious model is free to move toward the backdoor);
    - ``after_training``: the honest computation, fed the client's clean samples
      (``local_batches`` always without the trigger): against SDFC the reported score is
      the Fisher difference of the clean data, and that is also what the defense's hook
      stores for the client;
    - with ``report`` set, every scalar upload is then replaced by that value (against
      SDFC, whose weights are softmax(-minmax(score)), the lowest score wins the largest
      weight; 0 is a score no honest client reaches, since Delta >= 0).
    """

    def __init__(self, honest: ClientHook, report: float | None = None) -> None:
        self.honest = honest
        self.report = report

    @property
    def upload_keys(self) -> tuple[str, ...]:  # type: ignore[override]
        return self.honest.upload_keys

    def upload_shape(self, key: str, dim: int) -> tuple[int, ...]:
        return self.honest.upload_shape(key, dim)

    def before_training(
        self, client: ClientInfo, model: nn.Module, local_batches: Batches, server_batches: Batches | None
    ) -> Callable[[], Tensor] | None:
        return None

    def after_training(
        self, client: ClientInfo, model: nn.Module, local_batches: Batches, server_batches: Batches | None
    ) -> dict[str, Tensor]:
        def clean_batches(clean: bool = True) -> Any:
            return local_batches(clean=True)

        uploads = self.honest.after_training(client, model, clean_batches, server_batches)
        if self.report is None:
            return uploads
        return {key: torch.full_like(value, self.report) for key, value in uploads.items()}
