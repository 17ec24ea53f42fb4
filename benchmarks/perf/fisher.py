"""(f) SDFC's client hooks after local training, one client at a time vs a cohort's together.

After its local training every SDFC client computes the diagonal Fisher of its model on
its own data and on the server's validation split (6,000 images at the papers' protocol):
about 180 batches per client and round, each a forward and a backward pass, in every
round. With the training step compiled and cells packed, these passes, client by client,
would launch more kernels per round than the training itself. Counted and timed here on
one round's clients (Fashion-MNIST, 10 clients, 3 with the pixel pattern, simple_cnn, the
global model; ``--train-subset`` shrinks the clients' data, the validation split stays):

- one by one, batch by batch: each client's ``after_training``, its batches built one at
  a time (as before 2026-11-27);
- one by one, in chunks: the batches built 16 at a time (``HOOK_BATCH_CHUNK``);
- together: the cohort's ``after_training_together`` (one vmapped pass per batch step
  over all clients, ``fedbench.fisher.cohort_fishers``), which a cohort runs;
- with ``--compile MODE``, together with the passes over every client compiled, as a
  compiled cohort (``train.compile``) runs them (the compiling call left out).

Launches counted as in ``cohort.py`` (CPU: aten ops that would launch a kernel; GPU: CUDA
kernels); the clients' scores (SDFC's uploads) of each way against one by one.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from cohort import Workload, best_seconds, kernels_of, make_run  # noqa: E402
from common import machine, table  # noqa: E402

import torch  # noqa: E402

from defenses.sdfc import SCORE, SDFC  # noqa: E402
from fedbench import engine, fisher  # noqa: E402
from fedbench.fisher import cohort_passes  # noqa: E402

WAYS = {"one by one, batch by batch": (1, False), "one by one, in chunks of 16": (16, False),
        "together (cohort)": (16, True)}


def ways(compile_mode: str | None) -> dict[str, tuple[int, bool, str | None]]:
    """Each way's (hook batch chunk, together, compile mode); with ``compile_mode`` one more
    way: together, the passes over every client compiled (``train.compile``)."""
    rows = {label: (chunk, together, None) for label, (chunk, together) in WAYS.items()}
    if compile_mode is not None:
        rows[f"together, compiled ({compile_mode})"] = (16, True, compile_mode)
    return rows


@contextmanager
def counted_steps(counts: dict[str, int]):
    """Counts the cohort's vmapped Fisher steps, compiled and not, while open."""
    real_sums, real_autograd, real_whole = fisher._group_sums, fisher._group_sums_by_autograd, fisher._whole_cohort_sums

    def counted(real):
        def uncompiled(*args):
            counts["uncompiled"] += 1
            return real(*args)
        return uncompiled

    def whole(mode, by_autograd=False):
        # what the compiled pass compiles: the real ones, not the counters
        fisher._group_sums, fisher._group_sums_by_autograd = real_sums, real_autograd
        try:
            compiled_sums = real_whole(mode, by_autograd)
        finally:
            fisher._group_sums, fisher._group_sums_by_autograd = counted(real_sums), counted(real_autograd)
        if compiled_sums is None:
            return None

        def step(*args):
            counts["compiled"] += 1
            return compiled_sums(*args)
        return step

    fisher._group_sums, fisher._group_sums_by_autograd = counted(real_sums), counted(real_autograd)
    fisher._whole_cohort_sums = whole
    try:
        yield counts
    finally:
        fisher._group_sums, fisher._group_sums_by_autograd = real_sums, real_autograd
        fisher._whole_cohort_sums = real_whole


def hook_rows(estimator: str, train_subset: int | None, device: str, repeat: int, out: Path,
              compile_mode: str | None = None, convolution: str = "grouped") -> list[list]:
    """One row per way of running the hooks of one round's 10 clients."""
    run = make_run("simple_cnn", True, 1, "32-true", device, out, Workload("sdfc", train_subset, None, "pixel_pattern"))
    run.exp.defense.estimator = estimator
    assert isinstance(run.exp.defense, SDFC)
    jobs = run.cohort_jobs(run.select_clients(0))  # every client's model is the global one here
    cuda = run.device.type == "cuda"
    batches = sum(1 for job in jobs for batches in job.batches for _ in batches())  # of every client
    rows, reference, chunk_of_engine = [], None, engine.HOOK_BATCH_CHUNK
    for label, (chunk, together, mode) in ways(compile_mode).items():
        engine.HOOK_BATCH_CHUNK = chunk  # read by each client's batch iterators when they start

        def hooks():
            if together:
                with cohort_passes(mode, convolution):
                    return engine.protocol_uploads(jobs)
            return [job.protocol.after_training(job.client, job.model, *job.batches) for job in jobs]

        try:
            if mode is not None:
                hooks()  # compiles: left out of the count and the time
            launched = kernels_of(hooks, cuda)
            seconds = best_seconds(hooks, repeat, cuda)
            with counted_steps({"compiled": 0, "uncompiled": 0}) as steps:
                scores = torch.stack([uploads[SCORE] for uploads in hooks()]).double()
        finally:
            engine.HOOK_BATCH_CHUNK = chunk_of_engine
        reference = scores if reference is None else reference
        gap = float(((scores - reference).abs() / reference.abs()).max())
        vmapped = f"{steps['compiled']} + {steps['uncompiled']}" if together else "-"
        label += f", {convolution}" if together and convolution != "grouped" else ""
        rows.append([estimator, label, launched, round(launched / batches), vmapped, round(seconds, 2), f"{gap:.1e}"])
    return rows


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--estimators", nargs="+", default=["published", "empirical"])
    parser.add_argument("--train-subset", type=int, default=6000, help="clients' pool size (0: all)")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", default=None, help="adds the compiled passes' row, e.g. default")
    parser.add_argument("--convolution", default="grouped", choices=["grouped", "matmul", "triton"],
                        help="the together rows' convolutions (train.cohort_convolution; triton: a GPU's, or "
                             "Triton's interpreter with TRITON_INTERPRET=1, slow)")
    args = parser.parse_args(argv)
    if args.compile:
        import torch._inductor.config as inductor_config

        inductor_config.cpp.enable_kernel_profile = True  # CPU: each fused kernel shows in the profiler
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for estimator in args.estimators:
            rows += hook_rows(estimator, args.train_subset or None, args.device, args.repeat, Path(out), args.compile,
                              args.convolution)
    kind = "CUDA kernels" if torch.cuda.is_available() and args.device != "cpu" else "aten ops (CPU)"
    text = (f"### SDFC's hooks after one round's training, 10 clients, one by one vs together, {machine()}\n\n"
            + table(["estimator", "hooks run", f"{kind} per round", "per client-batch",
                     "vmapped steps, compiled + not", "seconds", "scores' largest relative gap"], rows))
    print(text, flush=True)
    return text


if __name__ == "__main__":
    main()
