"""Shared helpers: tiny data sets written in torchvision's on-disk formats, and tiny runs."""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")


def _triton_interpreted_without_a_gpu() -> None:
    """Without a GPU, Triton kernels (train.cohort_convolution=triton) run in Triton's
    interpreter, which Triton reads as it is imported: set here, before torch imports it.
    torch.compile on a CPU generates C++, not Triton, so nothing else changes."""
    import sys

    import torch

    if not torch.cuda.is_available() and "triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")


_triton_interpreted_without_a_gpu()


def triton_unavailable() -> str | None:
    """Why train.cohort_convolution=triton cannot run in this test process (on its GPU, or
    on the CPU in Triton's interpreter), or None: fedbench's own check, for skipping loudly."""
    import torch

    from fedbench.client_conv import unavailable

    return unavailable(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def triton_launches(monkeypatch) -> list[str]:
    """The names of the Triton kernels fedbench.client_conv launches from now on."""
    import fedbench.client_conv as client_conv

    launched: list[str] = []
    real = client_conv.launch
    monkeypatch.setattr(client_conv, "launch", lambda kernel, *a, **k: launched.append(kernel.fn.__name__)
                        or real(kernel, *a, **k))
    return launched


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def real_data_root() -> Path | None:
    """The real MNIST/Fashion-MNIST copy, when this machine has one."""
    candidates = [os.environ.get("FEDBENCH_DATA"), str(SHARED_DATA)]
    for candidate in candidates:
        if candidate and (Path(candidate) / "FashionMNIST" / "raw" / "train-labels-idx1-ubyte.gz").exists():
            return Path(candidate)
    return None


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> None:
    """The MNIST idx format: magic 0x0000 08 <ndim>, big-endian dims, uint8 data."""
    header = struct.pack(">I", 0x0800 + array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(path, "wb") as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)


def synthetic_images(n: int, num_classes: int, size: int, channels: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable images: class k has a bright horizontal bar at row 4 + 2k (of size 28/32), plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, size=n)
    images = rng.integers(0, 60, size=(n, channels, size, size))
    for k in range(num_classes):
        row = 4 + (2 * k) % (size - 8)
        images[labels == k, :, row : row + 2, 6 : size - 6] = 230
    return images.astype(np.uint8), labels.astype(np.uint8)


def write_mnist_like(root: Path, folder: str, n_train: int, n_test: int, gz: bool = False, seed: int = 0) -> None:
    raw = root / folder / "raw"
    suffix = ".gz" if gz else ""
    for split, n, offset in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = synthetic_images(n, 10, 28, 1, seed + offset)
        write_idx(raw / f"{split}-images-idx3-ubyte{suffix}", images[:, 0], gz)
        write_idx(raw / f"{split}-labels-idx1-ubyte{suffix}", labels, gz)


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_cifar(root: Path, kind: str, n_per_file: int, seed: int = 0) -> dict[str, str]:
    """CIFAR-10 ('cifar10') or CIFAR-100 ('cifar100') python pickles; returns {file: md5}."""
    num_classes = 10 if kind == "cifar10" else 100
    folder = root / ("cifar-10-batches-py" if kind == "cifar10" else "cifar-100-python")
    folder.mkdir(parents=True, exist_ok=True)
    label_key = "labels" if kind == "cifar10" else "fine_labels"
    names = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"] \
        if kind == "cifar10" else ["train", "test"]
    for i, name in enumerate(names):
        images, labels = synthetic_images(n_per_file, num_classes, 32, 3, seed + i)
        entry = {"data": images.reshape(n_per_file, -1), label_key: labels.astype(int).tolist()}
        (folder / name).write_bytes(pickle.dumps(entry))
    meta_name, meta_key = ("batches.meta", "label_names") if kind == "cifar10" else ("meta", "fine_label_names")
    (folder / meta_name).write_bytes(pickle.dumps({meta_key: [f"class{k}" for k in range(num_classes)]}))
    return {name: md5(folder / name) for name in [*names, meta_name]}


def patch_cifar_md5(monkeypatch, kind: str, md5s: dict[str, str]) -> None:
    """torchvision checks CIFAR files against the real md5s; point it at the tiny files'."""
    import torchvision.datasets as tvd

    cls = tvd.CIFAR10 if kind == "cifar10" else tvd.CIFAR100
    monkeypatch.setattr(cls, "train_list", [[n, md5s[n]] for n, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[n, md5s[n]] for n, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5s[cls.meta["filename"]]})


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    """A Fashion-MNIST-shaped data set of 1200 train / 300 test synthetic images."""
    root = tmp_path_factory.mktemp("tiny_data")
    write_mnist_like(root, "FashionMNIST", 1200, 300)
    write_mnist_like(root, "MNIST", 1200, 300, seed=5)
    return root


def tiny_experiment(root: Path, out: Path, **sections):
    """A few-second experiment on tiny data; ``sections`` override config sections."""
    from attacks.none import NoAttack
    from defenses.fedavg import FedAvg
    from fedbench.client import LocalTrainConfig
    from fedbench.data import DataConfig
    from fedbench.experiment import Experiment, FederationConfig, OutputConfig
    from fedbench.partition import PartitionConfig
    from fedbench.tracking import WandbConfig

    defaults = dict(
        attack=NoAttack(),
        defense=FedAvg(),
        data=DataConfig(root=str(root), download=False),
        partition=PartitionConfig(scheme="dirichlet", beta=0.5, min_size=10),
        # sequential on every machine (train.cohort=auto would train a cohort on a GPU)
        train=LocalTrainConfig(local_steps=4, batch_size=32, cohort=False),
        federation=FederationConfig(num_clients=5, rounds=2, final_rounds=2),
        output=OutputConfig(dir=str(out), progress=False),
        wandb=WandbConfig(mode="disabled"),
    )
    defaults.update(sections)
    return Experiment(**defaults)


# ---------------------------------------------------------------------------------------
# Independent references for tests: a model's parameters as one vector, and local SGD
# written out by hand (not through fedbench.client.LocalTrainer or torch.optim).


def flat_params(model) -> "torch.Tensor":
    """Trainable parameters in ``named_parameters()`` order, as one float vector."""
    import torch

    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


def load_flat(model, flat) -> None:
    """Copy a flat vector (``named_parameters()`` order) into the model's parameters."""
    import torch

    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
    assert offset == len(flat), "vector and model disagree on the number of parameters"


def endless_training_batches(data, pipeline, train_config, generator, poison=None):
    """Training batches epoch after epoch from one generator, as a client draws them."""
    from fedbench.client import iterate_batches

    while True:
        yield from iterate_batches(data, pipeline, train_config.batch_size, generator, train=True,
                                   drop_last=train_config.drop_last, poison=poison)


def sgd_by_hand(model, batches, steps: int, lr: float, momentum: float, weight_decay: float, extra_loss=None) -> None:
    """``steps`` steps of SGD on cross-entropy (+ ``extra_loss()``), written out:
    ``d = g + wd * p``; ``buf = d`` at the first step, then ``buf = momentum * buf + d``;
    ``p -= lr * buf`` (PyTorch's SGD without dampening or Nesterov)."""
    import torch
    import torch.nn.functional as F

    params = [p for p in model.parameters() if p.requires_grad]
    velocity = [None] * len(params)
    model.train()
    batches = iter(batches)
    for _ in range(steps):
        inputs, labels = next(batches)
        loss = F.cross_entropy(model(inputs), labels)
        if extra_loss is not None:
            loss = loss + extra_loss()
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for i, (p, g) in enumerate(zip(params, grads)):
                d = g + weight_decay * p
                velocity[i] = d.clone() if velocity[i] is None else momentum * velocity[i] + d
                p -= lr * velocity[i]


def spy_on_clients(run) -> "dict[int, torch.Tensor]":
    """Record every update a client hands to the server (client_result's output, sequential
    or cohort training)."""
    sent: dict = {}
    client_result = run.client_result

    def recording(job, *args):
        sent_result = client_result(job, *args)
        sent[job.client.client_id] = sent_result.update.detach().clone()
        return sent_result

    run.client_result = recording
    return sent


def wandb_records(path):
    """The records of an offline W&B run file (``run-<id>.wandb``), read independently of
    wandb (which ships no reader): a 7-byte header (":W&B", key, version), then LevelDB's
    log format, 32 KiB blocks of chunks (CRC32 4 bytes, length 2 bytes little-endian, type
    1 full / 2 first / 3 middle / 4 last); each record one ``wandb_internal_pb2.Record``."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, block, records, pending, at = path.read_bytes(), 32768, [], b"", 7
    assert data[:4] == b":W&B"
    while at + 7 <= len(data):
        if block - at % block < 7:  # a block's tail too short for a chunk header is padding
            at += block - at % block
            continue
        length, kind = struct.unpack("<HB", data[at + 4:at + 7])
        pending += data[at + 7:at + 7 + length]
        at += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _items(items) -> dict:
    import json

    return {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}


def wandb_history(records) -> list[dict]:
    """Every logged row of a W&B run's records, ``{metric: value}``."""
    return [_items(r.history.item) for r in records if r.HasField("history")]


def wandb_summary(records) -> dict:
    """A W&B run's summary: every summary update of its records, the last value of each key."""
    return {k: v for r in records if r.HasField("summary") for k, v in _items(r.summary.update).items()}


@pytest.fixture
def wandb_environment(monkeypatch):
    """W&B's environment variables (a run sets its mode and folders there) restored after the test."""
    for key in [k for k in os.environ if k.startswith("WANDB_")] + ["WANDB_MODE", "WANDB_DATA_DIR"]:
        monkeypatch.delenv(key, raising=False)


def wandb_exit_codes(records) -> list[int]:
    """The exit codes a W&B run's records hold (one when it was finished: 0 finished, 1 failed)."""
    return [r.exit.exit_code for r in records if r.HasField("exit")]
