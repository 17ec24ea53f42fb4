"""Defenses (aggregation rules), one per file, registered under their CLI names: every
module of this package is imported here, so a new defense is one new file."""

import importlib
import pkgutil

from defenses.base import DEFENSES, Aggregate, ClientHook, Defense, DefenseSetup, RoundContext

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")  # registration

__all__ = ["DEFENSES", "Aggregate", "ClientHook", "Defense", "DefenseSetup", "RoundContext"]
