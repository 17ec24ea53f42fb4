"""Attacks, one per file, registered under their CLI names."""

from attacks.base import ATTACKS, Attack, AttackSetup, BackdoorAttack, ClientInfo, PoisonPlan
from attacks import (  # noqa: F401  (registration)
    alie, badnets, blended, dba, gaussian, huge_update, ipm, label_flip, min_max, min_sum, nan_update, neurotoxin,
    none, norm_bounded, pixel_pattern, sign_flip,
)

__all__ = ["ATTACKS", "Attack", "AttackSetup", "BackdoorAttack", "ClientInfo", "PoisonPlan"]
