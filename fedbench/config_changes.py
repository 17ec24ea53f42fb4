"""Whether a run folder's earlier numbers were made with the config asked for now.

A run resumed from its checkpoint, and a grid cell skipped because it finished, keep
numbers made under the config they had then. Where that config differs from the one
asked for now, the results would mix two configs, or carry the new config's label over
the old config's numbers, and nothing would say so. So the two are compared before any
training, and every difference is refused in one message, each field with both values.

What is compared: the configs as written (``train.cohort: auto`` is ``auto``), field by
field as dotted names (``defense.init_args.calibration_lambda``, shown as the command
line spells it, ``defense.calibration_lambda``); a value against a mapping under the same
name is a change of that field. A field the earlier config lacks was added to fedbench
after it ran, so it ran with the field's default: the value now is compared with the
default of the classes asked for now (a field with no default is not compared). A field
only the earlier config has was removed since and is not compared. Values are compared
without loss: ``inf`` and ``nan`` are not ``None`` (summaries store them as the strings
"inf", "-inf", "nan").

What is not compared, because it changes where results go and how they are reported,
never the numbers: ``output.*``, ``logger``, ``wandb.*``, and where the data set's files
are read from (``data.root``, ``data.download``). Nor is what ``auto`` or an unset value
resolves to on the machine that runs it: cohort or sequential training (equal to float
rounding, tested), the thread count; a resumed run's device type is compared
(the engine: a CUDA run draws other random streams than a CPU run of the same seed).

A resumed run may change ``federation.rounds`` to run more rounds than it first asked
for (the rounds it runs are those of the longer run, tested), never fewer than its
checkpoint holds.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, Iterable

import torch

from fedbench.errors import FedbenchError
from fedbench.results import SUMMARY, read_summary

NOT_COMPARED = ("output", "logger", "wandb", "data.root", "data.download")
CHECKPOINT = Path("checkpoints") / "last.pt"
CHANGED_CELLS = "changed_cells.txt"

Change = tuple[str, Any, Any]  # (dotted field, earlier value, value now)


class ConfigChanged(FedbenchError):
    """Results on disk were made under another config than the one asked for now."""


class DefaultValue:
    """The earlier value of a field the earlier config lacks: the field's default."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DefaultValue) and other.value == self.value

    def __repr__(self) -> str:
        return f"{self.value!r} (its default; the field is newer than that run)"


def lossless(value: Any) -> Any:
    """A config as JSON can hold it without loss: tuples as lists, non-finite floats as the
    strings "inf", "-inf" and "nan" (JSON has no such numbers; fedbench writes them as null)."""
    if isinstance(value, dict):
        return {key: lossless(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [lossless(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def shown_name(name: str) -> str:
    """``defense.init_args.f`` as the command line and grid overrides spell it: ``defense.f``."""
    head, _, rest = name.partition(".init_args.")
    return f"{head}.{rest}" if rest and head in ("attack", "defense") else name


def _compared(name: str, also_ignored: tuple[str, ...]) -> bool:
    return not any(name == kept or name.startswith(f"{kept}.") for kept in NOT_COMPARED + also_ignored)


def config_changes(earlier: dict | None, now: dict | None, also_ignored: tuple[str, ...] = ()) -> list[Change]:
    """The fields whose values differ between two configs, in the order ``now`` has them
    (module docstring: which fields count); none when either config is unknown (None)."""
    if earlier is None or now is None:
        return []
    now = lossless(now)
    return _differences(lossless(earlier), now, "", _defaults_for(now), also_ignored)


def _differences(before: Any, after: Any, prefix: str, defaults: dict[str, Any],
                 ignored: tuple[str, ...]) -> list[Change]:
    if not (isinstance(before, dict) and isinstance(after, dict)):
        return [] if before == after else [(prefix.removesuffix("."), before, after)]
    changes = []
    for key, value in after.items():  # a key only `before` has was removed since: not compared
        name = f"{prefix}{key}"
        if not _compared(name, ignored):
            continue
        if key in before:
            changes += _differences(before[key], value, f"{name}.", defaults, ignored)
        else:  # added since the earlier run, which ran with its default
            changes += [(leaf, DefaultValue(defaults[leaf]), item) for leaf, item in _leaves(value, name).items()
                        if leaf in defaults and defaults[leaf] != item]
    return changes


def _leaves(value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, dict) or not value:
        return {name: value}
    return {leaf: item for key, inner in value.items()
            for leaf, item in _leaves(inner, f"{name}.{key}" if name else key).items()}


def _defaults_for(config: dict) -> dict[str, Any]:
    """Every field's default for the config's attack and defense classes, flat; empty when
    the config is not one fedbench can parse."""
    def class_path(section: str) -> str | None:
        chosen = config.get(section)
        return chosen.get("class_path") if isinstance(chosen, dict) else chosen

    return _defaults(class_path("attack"), class_path("defense"))


@functools.lru_cache(maxsize=64)
def _defaults(attack: str | None, defense: str | None) -> dict[str, Any]:
    from fedbench.config import dump_config, parse_config_dict

    chosen = {section: {"class_path": path} for section, path in (("attack", attack), ("defense", defense)) if path}
    try:
        return _leaves(lossless(dump_config(parse_config_dict(chosen))), "")
    except Exception:  # noqa: BLE001  (not a fedbench run config: no defaults known)
        return {}


def _checkpoint(run_dir: Path) -> dict | None:
    """A run folder's main checkpoint, its tensors mapped from the file, not read; None without one."""
    path = Path(run_dir) / CHECKPOINT
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True) if path.exists() else None


def _line(name: str, old: Any, new: Any) -> str:
    return f"  {shown_name(name)}: {old!r} then, {new!r} now"


def refuse_resuming_changed(run_dir: Path, now: dict | None, checkpoint: dict | None = None,
                            device_type: str | None = None) -> None:
    """Before resuming ``run_dir`` from its checkpoint (``checkpoint``, else read from the
    folder): every field that differs from the checkpoint's config (the rounds excepted: a
    run may go on for more), fewer rounds than the checkpoint holds, and (``device_type``
    given) another kind of device than the checkpoint's, refused in one message. Nothing
    to check without a checkpoint; a checkpoint saved before checkpoints kept their config
    (or device) is not compared on it."""
    checkpoint = _checkpoint(run_dir) if checkpoint is None else checkpoint
    if checkpoint is None:
        return
    lines = [_line(*change) for change in config_changes(checkpoint.get("config"), now, ("federation.rounds",))]
    lines += _too_few_rounds(now, checkpoint, "the checkpoint")
    earlier_device = checkpoint.get("device_type")
    if device_type is not None and earlier_device is not None and earlier_device != device_type:
        lines.append(f"  the device: {earlier_device} then, {device_type} now (fabric.accelerator; a CUDA run draws "
                     f"other random streams than a CPU run of the same seed)")
    if lines:
        raise ConfigChanged(
            f"the config differs from the one the checkpoint in {run_dir} was made with:\n" + "\n".join(lines)
            + "\nA run resumes with the config it began with: set these back, or start over with this config "
              "(output.resume=false, which overwrites that run, or another output.name).")


def _too_few_rounds(now: dict | None, checkpoint: dict, holder: str) -> list[str]:
    rounds, done = ((now or {}).get("federation") or {}).get("rounds"), int(checkpoint["round"]) + 1
    if isinstance(rounds, int) and rounds < done:
        return [f"  federation.rounds: at least {done} (the rounds {holder} holds), {rounds} now"]
    return []


def refuse_changed_cells(cells: Iterable[tuple[str, Path, dict | None]], grid_dir: Path) -> None:
    """Before a grid runs: each cell (id, folder, config now) whose folder holds a summary
    or a checkpoint made under another config, refused in one message, one line per
    changed field and values with the cells it concerns (all of them in
    ``changed_cells.txt`` in the grid's folder). A finished cell is compared with its
    summary's config, rounds included; an unfinished one with its checkpoint's, as a
    resumed run (more rounds allowed, not fewer than it holds). A checkpoint that cannot
    be read is left to the cell's own run (which records the failure)."""
    changed: dict[tuple[str, str], list[str]] = {}
    for cell_id, cell_dir, now in cells:
        for line, state in _cell_changes(Path(cell_dir), now):
            changed.setdefault((line, state), []).append(cell_id)
    if not changed:
        return
    listing = Path(grid_dir) / CHANGED_CELLS
    listing.write_text("".join(sorted({f"{cell}\n" for ids in changed.values() for cell in ids})))
    lines = [f"{line}, in {len(ids)} {state} cell{'s' if len(ids) > 1 else ''} "
             f"({', '.join(ids[:5])}{f' and {len(ids) - 5} more' if len(ids) > 5 else ''})"
             for (line, state), ids in changed.items()]
    raise ConfigChanged(
        f"the config differs from the one these cells under {Path(grid_dir) / 'cells'} were made with:\n"
        + "\n".join(lines)
        + f"\nA finished cell is not run again and an unfinished one resumes with its config: set these back "
          f"(the grid file, --set), choose another --out, or delete the folders of the cells listed in {listing} "
          f"to run them with this config (for more rounds of a finished cell, delete its summary.json alone: it "
          f"resumes from its last checkpoint where that holds its last round).")


def _cell_changes(cell_dir: Path, now: dict | None) -> list[tuple[str, str]]:
    """(line, "finished" or "unfinished") for each way the cell's earlier config differs."""
    if (cell_dir / SUMMARY).exists():
        earlier = (read_summary(cell_dir) or {}).get("config")
        return [(_line(*change), "finished") for change in config_changes(earlier, now)]
    try:
        checkpoint = _checkpoint(cell_dir)
    except Exception:  # noqa: BLE001  (an unreadable checkpoint: the cell's own run fails and says why)
        return []
    if checkpoint is None:
        return []
    lines = [_line(*change) for change in config_changes(checkpoint.get("config"), now, ("federation.rounds",))]
    return [(line, "unfinished") for line in lines + _too_few_rounds(now, checkpoint, "its checkpoint")]
