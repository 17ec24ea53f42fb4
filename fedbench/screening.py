"""Screening of client updates before any defense sees them.

An update is rejected, with the reason recorded, when it has the wrong size
(``wrong_size``) or any NaN or Inf (``non_finite``), or when what it reported for the
defense's client protocol (SDFC's score, FDCR's Fisher) holds a NaN or Inf
(``non_finite_upload``: a model that diverged gives an Inf Fisher): a crash guard for
every defense, FedAvg included, not a defense. A norm limit (``norm_above_limit``) applies only when a
user sets ``federation.max_update_norm``; by default there is none, so FedAvg is plain
FedAvg. Rejected clients get weight 0 and are marked excluded; the defense aggregates the
rest, and detection metrics count only the updates the defense saw (rejections are
reported apart, per reason). If every client is rejected the global model does not move.
"""

from __future__ import annotations

import torch
from torch import Tensor


def screen_updates(
    updates: Tensor, max_norm: float | None, wrong_size: list[bool] | None = None,
    uploads: dict[str, Tensor] | None = None,
) -> tuple[Tensor, list[str | None]]:
    """``(accepted [n] bool, reason per client or None)`` for stacked ``[n, d]`` updates;
    ``wrong_size[j]`` marks a client whose update had the wrong size (:func:`check_size`
    runs where the update is made: a wrong-size row cannot be stacked, so it arrives as zeros);
    ``uploads`` are the protocol's ``[n, ...]`` reports by name."""
    finite = torch.isfinite(updates).all(dim=1)
    if max_norm is None:
        within = torch.ones_like(finite)
    else:
        norms = torch.linalg.vector_norm(torch.where(finite.unsqueeze(1), updates, 0.0), dim=1)
        within = norms <= max_norm
    accepted = finite & within
    reasons: list[str | None] = []
    for ok_finite, ok_norm in zip(finite.tolist(), within.tolist()):
        reasons.append(None if ok_finite and ok_norm else ("non_finite" if not ok_finite else "norm_above_limit"))
    for j, finite_upload in enumerate(finite_uploads(uploads or {}, len(updates), updates.device).tolist()):
        if accepted[j] and not finite_upload:
            accepted[j], reasons[j] = False, "non_finite_upload"
    for j, wrong in enumerate(wrong_size or []):
        if wrong:
            accepted[j], reasons[j] = False, "wrong_size"
    return accepted, reasons


def finite_uploads(uploads: dict[str, Tensor], n: int, device: torch.device) -> Tensor:
    """``[n]`` bool: every floating value a client uploaded is finite."""
    finite = torch.ones(n, dtype=torch.bool, device=device)
    for values in uploads.values():
        if values.is_floating_point():
            finite &= torch.isfinite(values.reshape(n, -1)).all(dim=1).to(device)
    return finite


def check_size(update: Tensor, dim: int) -> str | None:
    if update.ndim != 1 or update.shape[0] != dim:
        return "wrong_size"
    return None
