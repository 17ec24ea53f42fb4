"""(b) Aggregation time of every registered defense for n clients at d = 11.2M (ResNet-18 size).

Every defense in the registry with its defaults and f = n // 5. FLTrust is timed given the
server update (its server-side training is local training, measured in
round_breakdown.py); SDFC given the clients' uploaded scores, FDCR given their uploaded
diagonal Fisher vectors; CRFL's aggregation only (its smoothing runs once, after the last
round). A rule whose options do not allow n (Bulyan needs n >= 4f + 3) shows "n/a".
The first call (which compiles the order-statistics kernel once per n, cached on disk)
is not timed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, table, timed  # noqa: E402

from defenses import DEFENSES  # noqa: E402
from defenses.base import DefenseSetup, RoundContext  # noqa: E402
from defenses.fdcr import FISHER  # noqa: E402
from defenses.fltrust import FLTrust  # noqa: E402
from defenses.sdfc import SCORE  # noqa: E402

RESNET18_DIM = 11_173_962


def aggregation_times(n: int, d: int, device: torch.device, names: list[str] | None = None) -> dict[str, float | str]:
    generator = torch.Generator(device=device).manual_seed(0)
    updates = torch.randn(n, d, generator=generator, device=device)
    counts = torch.randint(100, 1000, (n,), device=device)
    names = names or DEFENSES.names()
    uploads = {SCORE: torch.rand(n, dtype=torch.float64, device=device)}
    if "fdcr" in names:  # an [n, d] Fisher upload per client: only when FDCR is timed
        uploads[FISHER] = torch.rand(n, d, generator=generator, device=device)
    ctx = RoundContext(0, torch.arange(n), torch.zeros(d, device=device), torch.full((n,), 100),
                       uploads, torch.Generator(device=device).manual_seed(1))
    env = DefenseSetup(n, n, max(1, n // 5), layout=None, device=device)
    server_update = torch.randn(d, generator=generator, device=device)
    times: dict[str, float | str] = {}
    for name in names:
        defense = DEFENSES.get(name)()
        if name == "fltrust":
            times[name] = timed(lambda: FLTrust.combine(updates, server_update), sync=device)
            continue
        if defense.problems(env):
            times[name] = "n/a"
            continue
        defense.setup(env)
        times[name] = timed(lambda: defense.aggregate(updates, counts, ctx), sync=device)
    return times


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 20, 50])
    parser.add_argument("--dim", type=int, default=RESNET18_DIM)
    parser.add_argument("--defenses", nargs="+", default=None, help="default: every registered defense")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    results = {n: aggregation_times(n, args.dim, device, args.defenses) for n in args.clients}
    names = list(next(iter(results.values())))
    rows = [[name, *[results[n][name] for n in args.clients]] for name in names]
    text = f"### Aggregation seconds, d = {args.dim:,}, {machine()}\n\n" + table(
        ["defense", *[f"n = {n}" for n in args.clients]], rows)
    print(text, flush=True)
    return text


if __name__ == "__main__":
    main()
