"""Errors a user can fix. The CLI prints them without a traceback."""

from __future__ import annotations

from typing import Any, Iterable


class FedbenchError(Exception):
    """A problem the user can fix; its message says how."""


class ConfigError(FedbenchError):
    """One or more invalid configuration fields, each named with its value and what is allowed."""

    def __init__(self, problems: Iterable[tuple[str, Any, str]]) -> None:
        self.problems = list(problems)
        lines = [f"{field}={value!r}: {allowed}" for field, value, allowed in self.problems]
        if len(lines) == 1:  # one problem, one line
            super().__init__(f"invalid configuration: {lines[0]}")
        else:
            super().__init__(f"invalid configuration ({len(lines)} fields):\n" + "\n".join(f"  {line}" for line in lines))


class DataNotFoundError(FedbenchError):
    """A data set is neither on disk nor downloadable."""


def config_error(field: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError([(field, value, allowed)])


Problem = tuple[str, Any, str]


class Problems(list):
    """Invalid fields collected by a config's ``problems()``: (field, value, allowed)."""

    def need(self, ok: bool, field: str, value: Any, allowed: str) -> None:
        if not ok:
            self.append((field, value, allowed))
