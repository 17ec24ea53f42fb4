"""Defenses (aggregation rules), one per file, registered under their CLI names."""

from defenses.base import DEFENSES, Aggregate, ClientHook, Defense, DefenseSetup, RoundContext
from defenses import (  # noqa: F401  (registration)
    bulyan, centered_clipping, dnc, fdcr, fedavg, flame, fltrust, foolsgold, krum, median, multi_krum, norm_clipping,
    rfa, rlr, sdfc, trimmed_mean,
)

__all__ = ["DEFENSES", "Aggregate", "ClientHook", "Defense", "DefenseSetup", "RoundContext"]
