"""Several runs (grid cells) whose local training is one cohort: cross-cell cohorts.

A paper cell's cohort holds its round's 10 clients; on a GPU each step of that cohort is
still a few hundred small kernels. Runs of the same model on the same data with the same
local-training settings (cells that differ in attack, defense, seed) can step together:
each round, every unfinished run chooses its clients and runs its hooks, the clients of
all of them train as ONE cohort (:class:`~fedbench.cohort.CohortTrainer`: per step one
vmapped forward and backward over every client of every run), then each run aggregates,
evaluates, records and checkpoints on its own, exactly as :meth:`FederatedRun.run` does.

Every client keeps its own model copy, data, generator, poisoning, loss terms and step
count, so each run's numbers equal those it gets alone with ``train.cohort=true`` up to float
rounding (vmapped kernels over more clients may sum in another order). Runs that resumed
from different rounds still step together (each its own next round); a run whose rounds
are done drops out and writes its summary at once. Single process only. A run's wall
time (``wall_time_s``, and each record's round time) is the pack's: its rounds share
their time with the other runs' rounds.
"""

from __future__ import annotations

from pathlib import Path

from fedbench.cohort import cohort_cannot_train
from fedbench.engine import ClientResult, FederatedRun, OpenRound, train_in_one_cohort
from fedbench.errors import FedbenchError


def run_together(runs: list[FederatedRun]) -> list[dict]:
    """Every run to its last round, the clients of each round of all of them trained as
    one cohort; returns each run's summary (what :meth:`FederatedRun.run` returns)."""
    check_compatible(runs)
    summaries: dict[int, dict] = {}
    for run in runs:
        run.cohort = True  # whatever train.cohort=auto chose alone: its summary says what ran
        run.begin()
    while len(summaries) < len(runs):
        active = [run for run in runs if id(run) not in summaries and run.next_round is not None]
        opened = [run.open_round(run.next_round) for run in active]
        results = train_together(active, opened) if active else []
        for run, round_, result in zip(active, opened, results):
            run.keep(run.close_round(round_, result))
        for run in runs:  # a finished run's summary now: a later fault in the pack cannot cost it
            if id(run) not in summaries and run.next_round is None:
                summaries[id(run)] = run.end()
    return [summaries[id(run)] for run in runs]


def train_together(runs: list[FederatedRun], opened: list[OpenRound]) -> list[list[ClientResult]]:
    """Each run's clients of its open round, all trained in one cohort."""
    return train_in_one_cohort(runs, [round_.clients for round_ in opened])


def check_compatible(runs: list[FederatedRun]) -> None:
    """One message naming what differs when the runs cannot share a cohort: the model,
    local training, precision and device, the input pipeline, or the parameter layout."""
    if not runs:
        raise FedbenchError("run_together needs at least one run")
    first = runs[0]
    if first.exp.train.cohort is False:
        raise FedbenchError("runs trained together train as one cohort: set train.cohort to true or auto in each")
    cannot = cohort_cannot_train(first.model, first.exp.fabric.precision)
    if cannot is not None:
        raise FedbenchError(f"runs trained together train as one cohort, which cannot train these: {cannot}")
    for run in runs:
        if run.world != 1:
            raise FedbenchError("runs trained together need one process each (fabric.devices=1)")
        for field, mine, theirs in differences(first, run):
            raise FedbenchError(f"runs trained together must share {field}: {first.exp.run_name} has {mine!r}, "
                                f"{run.exp.run_name} has {theirs!r}")


def differences(first: FederatedRun, other: FederatedRun) -> list[tuple[str, object, object]]:
    """(field, first's value, other's value) for each setting that a shared cohort needs alike."""
    def pipeline(run: FederatedRun) -> tuple:
        p = run.data.pipeline
        return (p.mean.flatten().tolist(), p.std.flatten().tolist(), p.channels, p.augment, p.hflip, p.crop_padding)

    def layout(run: FederatedRun) -> tuple:
        return tuple(run.layout.names), tuple(tuple(s) for s in run.layout.shapes), tuple(run.layout.buffer_names)

    pairs = [("model", first.exp.model, other.exp.model), ("train", first.exp.train, other.exp.train),
             ("fabric", first.exp.fabric, other.exp.fabric), ("device", first.device, other.device),
             ("the input pipeline", pipeline(first), pipeline(other)),
             ("the parameter layout", layout(first), layout(other))]
    return [(field, mine, theirs) for field, mine, theirs in pairs if mine != theirs]


def run_configs(paths: list[str]) -> list[dict]:
    """The cells whose config files are ``paths``, trained together in this process (what
    ``fedbench grid --cells-per-process`` starts): each with its own Fabric, loggers,
    ``config.yaml`` and results, as ``fedbench run --config`` gives it, its own W&B run
    included. A cell's loggers are closed when the pack ends; a cell that finished before a
    fault in the pack keeps its summary and its W&B run is marked finished, not failed."""
    import yaml

    from fedbench.config import build_experiment, build_parser, parse_config_dict
    from fedbench.execution import prepare_run
    from fedbench.experiment import validate
    from fedbench.results import read_summary
    from fedbench.tracking import close_loggers

    parser = build_parser()
    exps = [build_experiment(parse_config_dict(yaml.safe_load(Path(p).read_text()), parser), parser) for p in paths]
    for exp in exps:  # every cell checked before any cell's files are written
        validate(exp)
    runs, loggers = [], []
    try:
        for exp in exps:
            fabric, exp_loggers = prepare_run(exp)
            loggers.append(exp_loggers)
            runs.append(FederatedRun(exp, fabric))
        return run_together(runs)
    finally:
        for exp, exp_loggers in zip(exps, loggers):
            # a cell's summary is written as it ends, before any later fault of the pack
            close_loggers(exp_loggers, read_summary(exp.run_dir))


def main(argv: list[str] | None = None) -> int:
    import sys

    from fedbench.execution import fail

    paths = list(sys.argv[1:] if argv is None else argv)
    try:
        summaries = run_configs(paths)
    except FedbenchError as err:
        return fail(str(err), "together")
    except KeyboardInterrupt:
        return 130
    for summary in summaries:
        final = ", ".join(f"{k}={v:.2f}" for k, v in summary["final"].items() if v is not None)
        print(f"{summary['run']}: {final}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
