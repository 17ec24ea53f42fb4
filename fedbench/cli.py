"""``fedbench run | grid | report``: the command line.

User mistakes (a bad option, a value out of range, missing data) end with one clear
message and exit status 2, never a traceback.

Class paths (``--defense my_defenses.MyDefense``, ``class_path:`` in a config or grid
file) are imported with the current working folder on the import path, as
``python -m`` would find them: a module saved in the folder you run ``fedbench`` from
works without PYTHONPATH. The folder is searched after installed packages, so it never
shadows them.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

USAGE = """usage: fedbench {run,grid,report} [options]

  run     one attack/defense pair          fedbench run --attack pixel_pattern --defense krum
  grid    every cell of a grid file         fedbench grid benchmarks/quick.yaml
  report  tables and plots from a grid      fedbench report runs/quick

'fedbench COMMAND --help' lists a command's options."""


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


def execute(exp) -> dict | None:
    """Run an experiment with Fabric and its W&B logger; the local files are always written.
    Returns the summary in the main process, None in the others."""
    import warnings

    import yaml

    # Lightning's all_gather goes through a torch helper that torch marks deprecated.
    warnings.filterwarnings("ignore", message=".*torch.distributed.nn.functional.all_gather is deprecated.*")

    from fedbench.engine import FederatedRun, validate
    from fedbench.tracking import wandb_logger

    validate(exp)
    logger = wandb_logger(exp.wandb, exp.run_dir, exp.run_name, exp.config)
    fabric = make_fabric(exp, [logger] if logger is not None else [])
    fabric.launch()
    if fabric.global_rank == 0:
        exp.run_dir.mkdir(parents=True, exist_ok=True)
        (exp.run_dir / "config.yaml").write_text(yaml.safe_dump(exp.config, sort_keys=False))
    try:
        summary = FederatedRun(exp, fabric).run()
        if logger is not None and fabric.global_rank == 0:
            logger.experiment.summary.update(
                {f"final/{k}": v for k, v in summary["final"].items() if v is not None}
            )
    finally:
        if logger is not None and fabric.global_rank == 0:
            logger.finalize("success")
            import wandb

            wandb.finish()
    return summary if fabric.global_rank == 0 else None


def run_command(argv: Sequence[str]) -> int:
    from jsonargparse import ArgumentError

    from fedbench.config import build_experiment, build_parser, parse_run_args
    from fedbench.errors import FedbenchError

    parser = build_parser()
    try:
        namespace = parse_run_args(argv, parser)
    except ArgumentError as err:
        return fail(str(err).strip(), "run")
    except FedbenchError as err:
        return fail(str(err), "run")
    try:
        exp = build_experiment(namespace, parser)
        summary = execute(exp)
    except FedbenchError as err:
        return fail(str(err), "run")
    except KeyboardInterrupt:
        print("interrupted: no summary was written; with --output.checkpoint_every K and --output.resume true "
              "the same command continues from the last checkpoint", file=sys.stderr)
        return 130
    if summary is None:  # a worker process of a multi-process run
        return 0
    final = summary["final"]
    shown = ", ".join(f"{k}={v:.2f}" for k, v in final.items() if v is not None)
    print(f"{exp.run_name}: {shown}  ->  {exp.run_dir}")
    return 0


def add_working_folder_to_path() -> None:
    """Let class paths name modules in the current folder (the console script, unlike
    ``python -m``, does not put it on ``sys.path``)."""
    folder = os.getcwd()
    if folder not in sys.path and "" not in sys.path:
        sys.path.append(folder)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    add_working_folder_to_path()
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "run":
        return run_command(rest)
    if command == "grid":
        from fedbench.grid import grid_command

        return grid_command(rest)
    if command == "report":
        from fedbench.report import report_command

        return report_command(rest)
    return fail(f"unknown command {command!r}; choose run, grid or report\n{USAGE}")


if __name__ == "__main__":
    sys.exit(main())
