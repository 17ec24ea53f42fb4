"""Whether a run folder's earlier numbers were made with the config asked for now.

A run resumed from its checkpoint, and a grid cell skipped because it finished, keep
numbers made under the config they had then. Where that config differs from the one
asked for now, the results would mix two configs, or carry the new config's label over
the old config's numbers, and nothing would say so. So the two are compared before any
training, and every difference is refused, named with both values.

What is compared: every field present in both configs, as dotted names
(``defense.init_args.calibration_lambda``). A field added to fedbench after the earlier
run is absent from its config and is not compared; nor is one removed since.

What is not compared, because it changes where results go and how they are reported,
never the numbers: ``output.*``, ``logger``, ``wandb.*``, and where the data set's files
are read from (``data.root``, ``data.download``). Execution options (``train.cohort``,
``train.compile``, ``train.cohort_convolution``, ``fabric.*``) are compared: they change
the numbers, at least by float rounding.

A resumed run may also change ``federation.rounds`` (to run more rounds than it first
asked for: the rounds it runs are those of the longer run, tested), but not to fewer
rounds than its checkpoint holds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import torch

from fedbench.errors import ConfigError
from fedbench.results import SUMMARY, read_summary, to_jsonable

NOT_COMPARED = ("output", "logger", "wandb", "data.root", "data.download")
CHECKPOINT = Path("checkpoints") / "last.pt"

Change = tuple[str, Any, Any]  # (dotted field, earlier value, value now)


def flat_fields(config: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists are values."""
    fields: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            fields.update(flat_fields(value, f"{name}."))
        else:
            fields[name] = value
    return fields


def _compared(name: str, also_ignored: tuple[str, ...]) -> bool:
    return not any(name == kept or name.startswith(f"{kept}.") for kept in NOT_COMPARED + also_ignored)


def config_changes(earlier: dict | None, now: dict | None, also_ignored: tuple[str, ...] = ()) -> list[Change]:
    """The fields whose values differ between two configs, sorted by name (module
    docstring: which fields count); none when either config is unknown (None)."""
    if earlier is None or now is None:
        return []
    # both as JSON gives them back (a summary's config went through JSON: tuples are lists)
    before, after = (flat_fields(json.loads(json.dumps(to_jsonable(c)))) for c in (earlier, now))
    return [(name, before[name], after[name]) for name in sorted(before.keys() & after.keys())
            if _compared(name, also_ignored) and before[name] != after[name]]


def _checkpoint(run_dir: Path) -> dict | None:
    """A run folder's main checkpoint, its tensors mapped from the file, not read; None without one."""
    path = Path(run_dir) / CHECKPOINT
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True) if path.exists() else None


def refuse_resuming_changed(run_dir: Path, now: dict | None, checkpoint: dict | None = None) -> None:
    """Before resuming ``run_dir`` from its checkpoint (``checkpoint``, else read from the
    folder): every field that differs from the checkpoint's config (the rounds excepted: a
    run may go on for more), and fewer rounds than the checkpoint holds, refused in one
    message. Nothing to check without a checkpoint, or with one saved before checkpoints
    kept their config."""
    checkpoint = _checkpoint(run_dir) if checkpoint is None else checkpoint
    if checkpoint is None:
        return
    how = "to start over with this config, set output.resume=false or choose another output.name"
    problems = [(name, value, f"{old!r}, the value in the checkpoint in {run_dir}: a run resumes with the config "
                 f"it began with; {how}")
                for name, old, value in config_changes(checkpoint.get("config"), now, ("federation.rounds",))]
    rounds, done = ((now or {}).get("federation") or {}).get("rounds"), int(checkpoint["round"]) + 1
    if isinstance(rounds, int) and rounds < done:
        problems.append(("federation.rounds", rounds, f"at least {done}, the rounds the checkpoint in {run_dir} "
                         f"holds; {how}"))
    if problems:
        raise ConfigError(problems)


def refuse_changed_cells(cells: Iterable[tuple[str, Path, dict | None]]) -> None:
    """Before a grid runs: each cell (id, folder, config now) whose folder holds a summary
    or a checkpoint made under another config, refused in one message, one line per
    changed field and values with the cells it concerns. A finished cell is compared
    with its summary's config (rounds included), an unfinished one with its checkpoint's
    (rounds excepted, as a resumed run)."""
    changed: dict[tuple[str, str, str, str], tuple[Any, Any, list[str]]] = {}
    for cell_id, cell_dir, now in cells:
        summary = read_summary(cell_dir) if (Path(cell_dir) / SUMMARY).exists() else None
        if summary is not None:
            state, earlier, ignored = "finished", summary.get("config"), ()
        else:
            checkpoint = _checkpoint(cell_dir)
            state, earlier, ignored = "checkpointed", (checkpoint or {}).get("config"), ("federation.rounds",)
        for name, old, value in config_changes(earlier, now, ignored):
            changed.setdefault((state, name, repr(old), repr(value)), (old, value, []))[2].append(cell_id)
    problems = []
    for (state, name, _, _), (old, value, ids) in changed.items():
        named = ", ".join(ids[:3]) + (f" and {len(ids) - 3} more" if len(ids) > 3 else "")
        problems.append((name, value, f"{old!r}, the value {len(ids)} {state} cell(s) ran with ({named}): a "
                         f"finished cell is not run again and an unfinished one resumes with its config; set it "
                         f"back, choose another --out, or delete those cells' folders to run them with this value"))
    if problems:
        raise ConfigError(problems)
