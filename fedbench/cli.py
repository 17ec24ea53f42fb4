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

from fedbench.execution import execute, fail

USAGE = """usage: fedbench {run,grid,report} [options]

  run     one attack/defense pair          fedbench run --attack pixel_pattern --defense krum
  grid    every cell of a grid file         fedbench grid benchmarks/quick.yaml
  report  tables and plots from a grid      fedbench report runs/quick

'fedbench COMMAND --help' lists a command's options."""


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
