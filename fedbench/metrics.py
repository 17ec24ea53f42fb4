"""The numbers a run reports, in one place.

Per evaluated round, :func:`fedbench.evaluation.evaluate` gives :data:`ROUND_METRICS`.
A run's final numbers are the registered :data:`FINAL_METRICS`, each a function of the
last ``final_rounds`` evaluated round records (the SDFC/FDCR papers' convention: the mean
over the last 5 rounds). Their registration order is the order of the run summary, the
W&B summary (``final/<name>``) and the report's columns. A new final metric is one
registered function ``(evaluated records) -> float | None``.
"""

from __future__ import annotations

from statistics import fmean
from typing import Callable

from fedbench.registry import Registry

ROUND_METRICS = ("clean_acc", "clean_loss", "asr", "asr_all")
"""What every evaluated round records (percent, except the loss); None where not measured."""

FinalMetric = Callable[[list[dict]], "float | None"]
FINAL_METRICS: Registry[FinalMetric] = Registry("final metric")


def _mean_of(key: str, records: list[dict]) -> float | None:
    values = [r[key] for r in records if r.get(key) is not None]
    return fmean(values) if values else None


def _robustness(asr_key: str) -> FinalMetric:
    def robustness(records: list[dict]) -> float | None:
        asr = _mean_of(asr_key, records)
        return None if asr is None else 100.0 - asr

    return robustness


def _overall(asr_key: str) -> FinalMetric:
    def overall(records: list[dict]) -> float | None:
        accuracy, asr = _mean_of("clean_acc", records), _mean_of(asr_key, records)
        return None if accuracy is None or asr is None else (accuracy + 100.0 - asr) / 2

    return overall


FINAL_METRICS.register("A")(lambda records: _mean_of("clean_acc", records))
"""A: clean test accuracy (%)."""
FINAL_METRICS.register("ASR")(lambda records: _mean_of("asr", records))
"""ASR: share of triggered test images whose true label is not the target that are
classified as the target (%); the headline."""
FINAL_METRICS.register("ASR_all")(lambda records: _mean_of("asr_all", records))
"""ASR over every triggered test image, target class included (the published SDFC/FDCR
code's count, what their tables' R means)."""
FINAL_METRICS.register("R")(_robustness("asr"))
"""R = 100 - ASR."""
FINAL_METRICS.register("R_all")(_robustness("asr_all"))
FINAL_METRICS.register("V")(_overall("asr"))
"""V = (A + R) / 2."""
FINAL_METRICS.register("V_all")(_overall("asr_all"))


def headline() -> list[str]:
    """The final metrics' names, in registration order."""
    return [name for name, _ in FINAL_METRICS.items()]


def final_numbers(records: list[dict], final_rounds: int) -> dict[str, float | None]:
    """Every registered final metric over the last ``final_rounds`` evaluated rounds
    (rounds with a ``clean_acc``); None where a metric does not apply (ASR without a trigger)."""
    evaluated = [r for r in records if r.get("clean_acc") is not None][-final_rounds:]
    return {name: (metric(evaluated) if evaluated else None) for name, metric in FINAL_METRICS.items()}


def flat_metrics(record: dict) -> dict[str, float]:
    """The scalar part of a round record, for loggers (W&B)."""
    flat: dict[str, float] = {}
    for key in (*ROUND_METRICS, "train_loss", "peak_memory_mb"):
        if record.get(key) is not None:
            flat[key] = record[key]
    for key, value in record["time"].items():
        flat[f"time/{key}"] = value
    flat["rejected"] = len(record["rejected"])
    for key, value in (record.get("detection") or {}).items():
        if value is not None:
            flat[f"detection/{key}"] = value
    return flat
