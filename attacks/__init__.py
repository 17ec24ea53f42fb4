"""Attacks, one per file, registered under their CLI names: every module of this package is
imported here, so a new attack is one new file."""

import importlib
import pkgutil

from attacks.base import ATTACKS, Attack, AttackSetup, BackdoorAttack, ClientInfo, PoisonPlan

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")  # registration

__all__ = ["ATTACKS", "Attack", "AttackSetup", "BackdoorAttack", "ClientInfo", "PoisonPlan"]
