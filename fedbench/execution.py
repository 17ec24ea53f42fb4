"""What the ``run``, ``grid`` and ``report`` commands share: running one experiment with
Fabric and its loggers, and the one-line error exit. None of the commands owns this
module, so they never import each other in a circle."""

from __future__ import annotations

import sys


def fail(message: str, command: str = "") -> int:
    prefix = f"fedbench {command}: " if command else "fedbench: "
    print(f"{prefix}error: {message}", file=sys.stderr)
    return 2


def make_fabric(exp, loggers: list):
    from lightning.fabric import Fabric

    fab = exp.fabric
    return Fabric(
        accelerator=fab.accelerator,
        devices=fab.devices,
        num_nodes=fab.num_nodes,
        strategy=fab.strategy,
        precision=fab.precision,
        loggers=loggers,
    )


def prepare_run(exp) -> tuple:
    """``(fabric, loggers)`` of a validated experiment, Fabric launched, and (in the main
    process) its folder with ``config.yaml``."""
    import yaml

    from fedbench.config_changes import refuse_resuming_changed
    from fedbench.experiment import validate
    from fedbench.tracking import make_loggers

    validate(exp)
    if exp.output.resume:  # before config.yaml is rewritten and a W&B run begins
        refuse_resuming_changed(exp.run_dir, exp.config)
    loggers = make_loggers(exp.logger, exp.wandb, exp.run_dir, exp.run_name, exp.config)
    fabric = make_fabric(exp, loggers)
    fabric.launch()
    if fabric.global_rank == 0:
        exp.run_dir.mkdir(parents=True, exist_ok=True)
        (exp.run_dir / "config.yaml").write_text(yaml.safe_dump(exp.config, sort_keys=False))
    return fabric, loggers


def execute(exp) -> dict | None:
    """Run an experiment with Fabric and its loggers (``--logger``: W&B by default,
    TensorBoard, CSV); the local JSON files are always written. Returns the summary in the
    main process, None in the others."""
    import warnings

    # Lightning's all_gather goes through a torch helper that torch marks deprecated.
    warnings.filterwarnings("ignore", message=".*torch.distributed.nn.functional.all_gather is deprecated.*")

    from fedbench.engine import FederatedRun
    from fedbench.tracking import close_loggers

    fabric, loggers = prepare_run(exp)
    main = fabric.global_rank == 0
    summary = None
    try:
        summary = FederatedRun(exp, fabric).run()
    finally:
        if main:
            close_loggers(loggers, summary)
    return summary if main else None
