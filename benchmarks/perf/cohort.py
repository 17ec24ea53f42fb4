"""(e) Sequential vs cohort training of one round's clients: launches and time.

The papers' setting (Fashion-MNIST from $FEDBENCH_DATA or ./data, 10 clients, Dirichlet
0.5, batch 64, simple_cnn; resnet18 optional), ``--steps`` local steps per client so a
CPU finishes quickly. Counted with torch.profiler over one round's local training:
- on CPU, the innermost ``aten::`` operator calls that compute (views, allocations and
  wrappers left out; an op such as ``aten::index`` whose children only allocate counts
  once itself; a matrix product or convolution counts itself besides its children):
  each is one kernel a GPU would launch (a ``_foreach`` op counts once: a GPU fuses it),
  which is what predicts the GPU gain (on CPU the cohort is not faster: the same arithmetic,
  in bigger but fewer kernels);
- on a GPU, the CUDA kernels actually launched.
``--compile MODE`` compiles the cohort (``train.compile``; its first round, which compiles,
is left out of every count and time); on CPU inductor's fused C++ kernels count one each.
Also timed (best of ``--repeat``), and samples per second (clients x steps x batch / s).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from common import count_cuda_graph_recordings, cuda_graph_note, machine, table  # noqa: E402

from attacks.base import ATTACKS  # noqa: E402
from defenses.base import DEFENSES  # noqa: E402
from fedbench.data import DataConfig  # noqa: E402
from fedbench.client import LocalTrainConfig  # noqa: E402
from fedbench.errors import FedbenchError  # noqa: E402
from fedbench.engine import FederatedRun  # noqa: E402
from fedbench.experiment import Experiment, FabricConfig, FederationConfig, OutputConfig  # noqa: E402
from fedbench.models import ModelConfig  # noqa: E402
from fedbench.tracking import WandbConfig  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Workload:
    """What the clients run besides plain local SGD: a defense whose client hook adds a loss
    term (sdfc: its Fisher calibration in every step), on a subset of the clients' pool; an
    attack whose clients poison their batches (pixel_pattern: 3 of 10 clients)."""

    defense: str = "fedavg"
    train_subset: int | None = None
    compile: str | None = None  # the cohort's train.compile
    attack: str = "none"

    def label(self, model: str) -> str:
        extras = [name for name in (self.attack, self.defense) if name not in ("none", "fedavg")]
        return " + ".join([model] + extras) + (f", cohort compiled ({self.compile})" if self.compile else "")


def make_run(model: str, cohort: bool, steps: int, precision: str, device: str, out: Path,
             workload: Workload = Workload(), train_options: dict | None = None,
             fabric_options: dict | None = None) -> FederatedRun:
    """One paper-setting run of ``steps`` local steps; ``train_options``, ``fabric_options``:
    more ``train.`` and ``fabric.`` settings."""
    exp = Experiment(
        attack=ATTACKS.get(workload.attack)(), defense=DEFENSES.get(workload.defense)(), model=ModelConfig(name=model),
        data=DataConfig(train_subset=workload.train_subset),
        train=LocalTrainConfig(local_steps=steps, cohort=cohort, compile=workload.compile if cohort else None,
                               **(train_options or {})),
        federation=FederationConfig(rounds=1, final_rounds=1),
        fabric=FabricConfig(accelerator=device, precision=precision, **(fabric_options or {})),
        output=OutputConfig(dir=str(out), progress=False), wandb=WandbConfig(mode="disabled"),
    )
    return FederatedRun(exp)


# Ops that only change metadata, allocate, or wrap other ops: no kernel of their own on a GPU.
NO_KERNEL = {"aten::as_strided", "aten::as_strided_", "aten::view", "aten::_reshape_alias", "aten::_unsafe_view",
             "aten::resolve_conj", "aten::resolve_neg", "aten::empty", "aten::empty_strided", "aten::resize_",
             "aten::expand", "aten::permute", "aten::transpose", "aten::t", "aten::unsqueeze", "aten::squeeze",
             "aten::slice", "aten::select", "aten::detach", "aten::alias", "aten::lift_fresh", "aten::unbind",
             "aten::split", "aten::narrow", "aten::scalar_tensor", "aten::_local_scalar_dense",
             "aten::reshape", "aten::flatten", "aten::unflatten", "aten::view_as", "aten::expand_as",
             "aten::broadcast_to", "aten::broadcast_tensors", "aten::movedim", "aten::chunk", "aten::split_with_sizes",
             "aten::unsqueeze_", "aten::squeeze_", "aten::t_", "aten::unfold", "aten::diagonal", "aten::numpy_T",
             "aten::mT", "aten::conj", "aten::_conj", "aten::_neg_view", "aten::to", "aten::type_as",
             "aten::contiguous", "aten::item", "aten::empty_like", "aten::new_empty", "aten::new_empty_strided",
             "aten::requires_grad_", "aten::detach_", "aten::set_", "aten::is_nonzero", "aten::result_type"}


def launches(run: FederatedRun, cuda: bool) -> int:
    """Kernels of one round's local training: CUDA kernels on a GPU, innermost computing aten ops on CPU."""
    clients = run.select_clients(0)
    return kernels_of(lambda: run.train_clients(clients), cuda)


def kernels_of(work: Callable[[], object], cuda: bool) -> int:
    """Kernels ``work()`` launches: CUDA kernels on a GPU, innermost computing aten ops on CPU."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        work()
    if cuda:
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return sum(cpu_launches(e) for e in prof.events() if e.cpu_parent is None)


# Matrix products and convolutions launch their own kernel besides what their children
# do (addmm copies the bias into the output first, a vmapped mm may copy its input).
OWN_KERNEL = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::mv", "aten::addmv",
              "aten::mkldnn_convolution", "aten::convolution_backward", "aten::_slow_conv2d_forward",
              "aten::_slow_conv2d_backward", "aten::_convolution_depthwise2d"}


def cpu_launches(event) -> int:
    """Kernels under a CPU profiler event: a ``_foreach`` op is one (a GPU fuses it over its
    tensor list; the CPU loops); a matrix product or convolution is one plus its children's;
    any other op whose children launch kernels is those kernels; an op that computes and
    whose children launch none (a leaf, or ``aten::index`` whose children only allocate or
    view) is one; views, allocations and wrappers are none."""
    if event.name.startswith("aten::_foreach"):
        return 1
    inner = sum(cpu_launches(child) for child in event.cpu_children)
    if event.name in OWN_KERNEL:
        return 1 + inner
    if inner:
        return inner
    return int(event.name.startswith("aten::") and event.name not in NO_KERNEL or "cpp_fused" in event.name)


def seconds(run: FederatedRun, repeat: int, cuda: bool) -> float:
    clients = run.select_clients(0)
    return best_seconds(lambda: run.train_clients(clients), repeat, cuda)


def best_seconds(work: Callable[[], object], repeat: int, cuda: bool) -> float:
    """The best of ``repeat`` timings of ``work()``, after one warm-up call."""
    work()
    best = float("inf")
    for _ in range(repeat):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        work()
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def measure_row(model: str, precision: str, steps: int, repeat: int, device: str, out: Path,
                workload: Workload = Workload()) -> list:
    """Launches (per round, and per further step: the round at 2 x ``steps`` minus the round
    at ``steps``, over ``steps``, which leaves out each client's fixed cost of loading and
    flattening its model) and samples/s, sequential and cohort; a failure says why."""
    measured = {}
    label = workload.label(model)
    try:
        if workload.compile:
            # compile on a throwaway run, whose graphs serve the runs measured next: each of
            # those starts fresh (SDFC's first round computes two Fishers per client, later ones one)
            throwaway = make_run(model, True, steps, precision, device, out, workload)
            throwaway.train_clients(throwaway.select_clients(0))
        for cohort in (False, True):
            run = make_run(model, cohort, steps, precision, device, out, workload)
            cuda = run.device.type == "cuda"
            per_round = launches(run, cuda)
            longer = launches(make_run(model, cohort, 2 * steps, precision, device, out, workload), cuda)
            measured[cohort] = (per_round, (longer - per_round) / steps, seconds(run, repeat, cuda))
    except (FedbenchError, RuntimeError) as err:  # one row's failure (a refusal or a CUDA error) leaves the others
        return [label, precision, f"failed: {err}"[:120]] + [""] * 7
    samples = 10 * steps * run.exp.train.batch_size
    (seq_k, seq_step, seq_s), (coh_k, coh_step, coh_s) = measured[False], measured[True]
    return [label, precision, seq_k, coh_k, round(seq_step), round(coh_step), f"{seq_step / coh_step:.1f}x",
            round(samples / seq_s), round(samples / coh_s), f"{seq_s / coh_s:.2f}x"]


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["simple_cnn"])
    parser.add_argument("--precisions", nargs="+", default=["32-true"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--defense", default="fedavg", help="e.g. sdfc: its calibration term in every step")
    parser.add_argument("--train-subset", type=int, default=None, help="clients' pool size (default: all)")
    parser.add_argument("--compile", default=None, help="the cohort's train.compile mode, e.g. default")
    parser.add_argument("--attack", default="none", help="e.g. pixel_pattern: its clients poison every batch")
    args = parser.parse_args(argv)
    if args.compile == "reduce-overhead" and torch.cuda.is_available():
        count_cuda_graph_recordings()
    if args.compile:
        import torch._inductor.config as inductor_config

        inductor_config.cpp.enable_kernel_profile = True  # CPU: each fused kernel shows in the profiler
    workload = Workload(args.defense, args.train_subset, args.compile, args.attack)
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for model in args.models:
            for precision in args.precisions:
                rows.append(measure_row(model, precision, args.steps, args.repeat, args.device, Path(out), workload))
                # each row as soon as it is measured: a run stopped at its time limit keeps them
                print("| " + " | ".join(map(str, rows[-1])) + " |", file=sys.stderr, flush=True)
    kind = "CUDA kernels" if torch.cuda.is_available() and args.device != "cpu" else "aten ops (CPU)"
    text = (f"### One round's local training, 10 clients x {args.steps} steps of 64, sequential vs cohort, "
            f"{machine()}\n\n"
            + table(["model", "precision", f"{kind} per round, sequential", "cohort", "per step, sequential",
                     "per step, cohort", "fewer per step", "samples/s sequential", "samples/s cohort", "speed-up"],
                    rows) + cuda_graph_note(args.compile))
    print(text, flush=True)
    return text


if __name__ == "__main__":
    main()
