"""Name -> class registries, timm style: a decorator sits next to each class.

The registered name is the CLI name (``--defense multi_krum``). The class path
(``defenses.multi_krum.MultiKrum``) always works too, which is how a user's own class
outside the suite is chosen.
"""

from __future__ import annotations

import importlib
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.kind} name {name!r} is already registered to {self._entries[name]!r}")
            self._entries[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {', '.join(self.names())}")
        return self._entries[name]

    def resolve(self, name: str) -> T:
        """A registered name, or a dotted path ``module.attribute`` to a user's own entry
        (the module is imported; the working folder is on the import path for the CLI)."""
        if name in self._entries or "." not in name:
            return self.get(name)
        module, _, attribute = name.rpartition(".")
        found = getattr(importlib.import_module(module), attribute, None)
        if found is None:
            raise KeyError(f"module {module!r} has no {self.kind} {attribute!r}")
        return found

    def problems(self, field: str, name: str) -> list[tuple[str, object, str]]:
        """``[(field, name, allowed)]`` when ``name`` resolves to nothing, else ``[]``."""
        try:
            self.resolve(name)
        except Exception as err:  # a user's module may fail in any way while importing
            detail = f" ({type(err).__name__}: {err})" if "." in name else ""
            return [(field, name, f"one of: {', '.join(self.names())}; or module.name of your own{detail}")]
        return []

    def names(self) -> list[str]:
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        """``(name, entry)`` in registration order."""
        return list(self._entries.items())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def class_path(self, name: str) -> str:
        obj = self.get(name)
        return f"{obj.__module__}.{obj.__qualname__}"

    def name_of(self, cls: type) -> str | None:
        for name, obj in self._entries.items():
            if obj is cls:
                return name
        return None
