"""(c) One round of the paper protocol, broken down: local training, client hooks
(SDFC's Fisher estimation on local and validation data), aggregation, evaluation.

Fashion-MNIST (from $FEDBENCH_DATA or ./data), 10 clients, Dirichlet(0.5), E local
epochs, simple_cnn, 30% pixel-pattern attackers. Timed: round 1 (``--round``), a
steady-state round; in round 0 SDFC also computes each client's Fisher difference on
the starting model before training, so its hooks cost twice as much there.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, table  # noqa: E402

from attacks.pixel_pattern import PixelPattern  # noqa: E402
from defenses import DEFENSES  # noqa: E402
from fedbench.client import LocalTrainConfig  # noqa: E402
from fedbench.engine import FederatedRun  # noqa: E402
from fedbench.experiment import Experiment, FederationConfig, OutputConfig  # noqa: E402
from fedbench.tracking import WandbConfig  # noqa: E402


def one_round(defense: str, epochs: int, out: Path, device: str, timed_round: int) -> tuple[dict, bool]:
    """The timed round's seconds, and whether its clients trained as a cohort (``train.cohort``
    auto: on a GPU)."""
    exp = Experiment(
        attack=PixelPattern(), defense=DEFENSES.get(defense)(),
        train=LocalTrainConfig(local_epochs=epochs),
        federation=FederationConfig(rounds=timed_round + 1, final_rounds=1),
        output=OutputConfig(dir=str(out), progress=False), wandb=WandbConfig(mode="disabled"),
    )
    exp.fabric.accelerator = device
    run = FederatedRun(exp)
    for round_index in range(timed_round):
        run.run_round(round_index)
    return run.run_round(timed_round)["time"], run.cohort


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--defenses", nargs="+", default=["fedavg", "sdfc", "fltrust"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--round", type=int, default=1, help="which round to time (0 = the first)")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for defense in args.defenses:
            t, cohort = one_round(defense, args.epochs, Path(out), args.device, args.round)
            rows.append([defense, "cohort" if cohort else "sequential", t["local_training"], t["client_hook"],
                         f"{100 * t['client_hook'] / t['local_training']:.0f}%", t["aggregation"], t["evaluation"],
                         t["round"]])
    text = (f"### Paper-protocol round {args.round} (Fashion-MNIST, 10 clients, E = {args.epochs}), seconds, "
            f"{machine()}\n\n"
            + table(["defense", "clients trained", "local training", "client hooks (Fisher)", "hooks / training",
                     "aggregation", "evaluation", "round"], rows))
    print(text, flush=True)
    return text


if __name__ == "__main__":
    main()
