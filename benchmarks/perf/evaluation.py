"""(i) One round's evaluation of the global model: torchmetrics batch by batch vs compiled.

Every round the engine evaluates the global model on the whole test set (clean accuracy,
loss, and with a backdoor both ASRs: a second forward pass over the triggered images).
Batch by batch with torchmetrics that is some 100 launches per batch of 1,024 images
(pipeline, forward, loss, the trigger's blend, second forward, each metric's update);
under ``train.compile`` each batch's counts are one compiled graph
(``fedbench.evaluation.evaluate_compiled``; a shorter last batch is padded, so one graph
serves all). Counted and timed on Fashion-MNIST's 10,000 test images with simple_cnn,
after one round of 2 local steps (so the model is not the initial one): launches as in
``cohort.py`` (CPU: aten ops that would launch a kernel; GPU: CUDA kernels), seconds the
best of ``--repeat`` after a warm-up call (the compiled path compiled on that call).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from cohort import Workload, best_seconds, kernels_of, make_run  # noqa: E402
from common import machine, table  # noqa: E402

import torch  # noqa: E402

from fedbench.evaluation import evaluate  # noqa: E402


def attack_rows(attack: str, modes: list[str | None], device: str, out: Path, repeat: int) -> list[list]:
    run = make_run("simple_cnn", True, 2, "32-true", device, out, Workload("fedavg", None, None, attack))
    run.run_round(0)
    cuda = run.device.type == "cuda"
    data, exp = run.data, run.exp
    rows, reference = [], None
    for mode in modes:
        def once() -> dict:
            return evaluate(run.model, data.test, data.pipeline, exp.attack, data.num_classes,
                            exp.federation.eval_batch_size, run.fabric.autocast, exp.train.channels_last, mode)

        seconds = best_seconds(once, repeat, cuda)
        result = once()
        reference = reference or result
        same = all(result[k] == reference[k] or abs(result[k] - reference[k]) < 1e-4 * max(1, abs(reference[k]))
                   for k in result if result[k] is not None)
        rows.append([attack, mode or "torchmetrics, batch by batch", kernels_of(once, cuda), round(seconds, 3),
                     "yes" if same else f"no: {result}"])
    return rows


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--compile", nargs="*", default=["default"], help="train.compile modes to compare")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for attack in ("none", "pixel_pattern"):
            rows += attack_rows(attack, [None, *args.compile], args.device, Path(out), args.repeat)
            for row in rows[-1 - len(args.compile):]:
                print("| " + " | ".join(map(str, row)) + " |", file=sys.stderr, flush=True)
    kind = "CUDA kernels" if torch.cuda.is_available() and args.device != "cpu" else "aten ops (CPU)"
    text = (f"### One evaluation of the global model (10,000 test images, batch 1,024), {machine()}\n\n"
            + table(["attack", "evaluation", f"{kind} per evaluation", "seconds", "same numbers"], rows))
    print(text, flush=True)
    return text


if __name__ == "__main__":
    main()
