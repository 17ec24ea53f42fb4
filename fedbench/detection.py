"""How well a defense's verdicts match the true attackers.

Positives are the clients that attacked this round (malicious and scheduled). The engine
passes only the updates that reached the defense (the screening's rejections are reported
apart), so the rates judge the defense's own verdicts. Rates
whose denominator is 0 are None (precision when nothing was excluded, FPR when every
selected client attacked).
"""

from __future__ import annotations

import math
from statistics import fmean


def detection_metrics(attacking: list[bool], excluded: list[bool], weights: list[float]) -> dict | None:
    if not any(attacking):
        return None
    tp = sum(a and e for a, e in zip(attacking, excluded))
    fp = sum((not a) and e for a, e in zip(attacking, excluded))
    fn = sum(a and not e for a, e in zip(attacking, excluded))
    tn = sum((not a) and not e for a, e in zip(attacking, excluded))
    return {
        "tp": tp, "fp": fp, "fn": fn, "tn": tn,
        "tpr": tp / (tp + fn),
        "fpr": fp / (fp + tn) if fp + tn else None,
        "precision": tp / (tp + fp) if tp + fp else None,
        "recall": tp / (tp + fn),
        "malicious_weight": float(sum(w for a, w in zip(attacking, weights) if a)),
    }


def summarise_detection(per_round: list[dict | None]) -> dict | None:
    """Mean of each rate over the rounds that had attackers (None and NaN values skipped:
    a defense whose scores went NaN gives NaN weights in that round)."""
    rounds = [d for d in per_round if d is not None]
    if not rounds:
        return None
    summary: dict = {"rounds": len(rounds)}
    for key in ("tpr", "fpr", "precision", "recall", "malicious_weight"):
        values = [d[key] for d in rounds if d[key] is not None and math.isfinite(d[key])]
        summary[key] = fmean(values) if values else None
    return summary
