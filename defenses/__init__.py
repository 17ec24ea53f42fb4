"""Defenses (aggregation rules), one per file, registered under their CLI names."""

from defenses.base import DEFENSES, Aggregate, ClientHook, Defense, DefenseSetup, RoundContext
from defenses import fedavg, fltrust, krum, median, multi_krum, norm_clipping, sdfc, trimmed_mean  # noqa: F401

__all__ = ["DEFENSES", "Aggregate", "ClientHook", "Defense", "DefenseSetup", "RoundContext"]
