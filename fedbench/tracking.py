"""Weights & Biases logging through Lightning's ``WandbLogger`` (a Fabric logger)."""

from __future__ import annotations

import netrc
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal


@dataclass
class WandbConfig:
    """Weights & Biases.

    Args:
        mode: auto (online when logged in, else offline), online, offline or disabled.
        project: W&B project.
        entity: W&B entity (user or team); None = your default.
        group: run group; a grid sets it to the grid's name so its cells sit side by side.
        tags: run tags.
    """

    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    project: str = "fedbench"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)


def logged_in() -> bool:
    """An API key in the environment or in ~/.netrc for api.wandb.ai."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_mode(mode: str) -> str:
    if mode != "auto":
        return mode
    env_mode = os.environ.get("WANDB_MODE")
    if env_mode in ("online", "offline", "disabled"):
        return env_mode
    return "online" if logged_in() else "offline"


def use_local_wandb_dirs(root: Path, mode: str) -> None:
    """W&B's files, cache and settings under ``root`` (never the home folder)."""
    for sub in ("cache", "data", "config", "artifacts"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    os.environ["WANDB_CACHE_DIR"] = str(root / "cache")
    os.environ["WANDB_DATA_DIR"] = str(root / "data")
    os.environ["WANDB_CONFIG_DIR"] = str(root / "config")
    os.environ["WANDB_ARTIFACT_DIR"] = str(root / "artifacts")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ["WANDB_MODE"] = mode  # the configured mode wins over a stale environment


def wandb_logger(config: WandbConfig, run_dir: Path, run_name: str, hyperparams: dict | None = None):
    """A ``WandbLogger`` whose files, cache and settings live under ``run_dir/wandb``; None when disabled."""
    mode = resolve_mode(config.mode)
    if mode == "disabled":
        return None
    root = (Path(run_dir) / "wandb").resolve()
    use_local_wandb_dirs(root, mode)
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(
        name=run_name,
        project=config.project,
        entity=config.entity,
        group=config.group,
        tags=list(config.tags),
        save_dir=str(root.parent),
        mode=mode,
        config=hyperparams or {},
        settings=_settings(),
        # A run of its own even beside other runs of this process (cells trained together,
        # fedbench.together): wandb then leaves its global `wandb.run` unset, so Lightning's
        # logger, which reuses a global run, creates one per cell; close_loggers finishes it.
        reinit="create_new",
    )
    # Lightning always passes wandb's retired `anonymous` option, which only prints a warning.
    getattr(logger, "_wandb_init", {}).pop("anonymous", None)
    return logger


def close_loggers(loggers: list, summary: dict | None) -> None:
    """Finalize a run's loggers. Its W&B run gets the ``summary``'s final numbers as
    ``final/<key>`` in its W&B summary and is finished through its own run object;
    ``summary=None`` (the run did not finish) marks the W&B run failed (exit code 1). A run
    that failed before it logged anything gets no W&B run. A logger that cannot be closed
    says so on stderr: it neither hides the run's own error nor keeps the others open."""
    import sys

    final = summary["final"] if summary is not None else None
    for logger in loggers:
        try:
            logger.finalize("success" if final is not None else "failed")
            # Lightning creates the W&B run at the first log; `experiment` would create one now
            if is_wandb(logger) and logger._experiment is not None:
                run = logger.experiment
                if final is not None:
                    run.summary.update({f"final/{k}": v for k, v in final.items() if v is not None})
                run.finish(exit_code=0 if final is not None else 1)
        except Exception as err:  # the local JSON files hold the results; a logger is a copy
            print(f"fedbench: could not close the {type(logger).__name__}: {type(err).__name__}: {err}",
                  file=sys.stderr)


def _settings():
    import wandb

    return wandb.Settings(console="off", x_disable_stats=True, silent=True)


LoggerName = Literal["wandb", "tensorboard", "csv"]


def make_loggers(names: list[str], config: WandbConfig, run_dir: Path, run_name: str,
                 hyperparams: dict | None = None) -> list:
    """Lightning Fabric loggers for ``--logger``: W&B (as configured in ``wandb``; none when
    its mode is disabled), TensorBoard event files under ``run_dir/tensorboard`` and a CSV
    of the per-round metrics at ``run_dir/csv/metrics.csv``. They all receive the same
    per-round metrics (``fedbench.metrics.flat_metrics``)."""
    from lightning.fabric.loggers import CSVLogger, TensorBoardLogger

    loggers = []
    for name in dict.fromkeys(names):
        if name == "wandb":
            logger = wandb_logger(config, run_dir, run_name, hyperparams)
            if logger is not None:
                loggers.append(logger)
        elif name == "tensorboard":
            loggers.append(TensorBoardLogger(root_dir=str(run_dir), name="tensorboard", version="",
                                             default_hp_metric=False))
        elif name == "csv":
            loggers.append(CSVLogger(root_dir=str(run_dir), name="csv", version=""))
    return loggers


def is_wandb(logger) -> bool:
    return type(logger).__name__ == "WandbLogger"
