"""Attacks, one per file, registered under their CLI names."""

from attacks.base import ATTACKS, Attack, AttackSetup, BackdoorAttack, ClientInfo, PoisonPlan
from attacks import badnets, blended, dba, huge_update, nan_update, none, pixel_pattern  # noqa: F401  (registration)

__all__ = ["ATTACKS", "Attack", "AttackSetup", "BackdoorAttack", "ClientInfo", "PoisonPlan"]
