"""Data sets as uint8 tensors on the training device, and batched on-device transforms.

Each data set is read once through torchvision into memory as uint8 ``[N, C, H, W]``
and moved to the device. Training batches are turned into model inputs on the device:
``uint8 -> [0, 1] -> random crop with zero padding -> horizontal flip -> normalise ->
repeat grey to 3 channels``. There is no per-sample PIL path.

The published protocol of SDFC (ECCV 2024) and FDCR (NeurIPS 2024) is the default:
the last 10% of the training set (in file order) is held by the server as a
validation split, the first 90% is partitioned over the clients; MNIST and
Fashion-MNIST are resized to 32x32 and repeated to 3 channels with the MNIST mean
0.1307 and std 0.3081 (for Fashion-MNIST too, as the published code does).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import gzip
import io
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.error import URLError

import torch
import torch.nn.functional as F
from torch import Tensor

from fedbench.errors import DataNotFoundError, Problem, Problems
from fedbench.registry import Registry
from fedbench.seeding import torch_generator


@dataclass
class LabelledImages:
    """One split of a data set, as a registered data set function returns it.

    Attributes:
        images: uint8 ``[N, C, H, W]`` at the data set's own resolution.
        labels: int64 ``[N]`` in ``[0, num_classes)``.
        num_classes: classes of the task.
        mean, std: per-channel normalisation of [0, 1] pixels (one value for grey images).
        hflip: whether a horizontal flip is a label-preserving augmentation here.
    """

    images: Tensor
    labels: Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool = False


DataSetFunction = Callable[[Path, bool, bool], LabelledImages]
DATASETS: Registry[DataSetFunction] = Registry("data set")
"""``--data.name NAME``: a function ``(root, train, download) -> LabelledImages``. Your own
data set is one such function; name it by its path (``--data.name my_data.my_set``: the
module is imported from the folder you run fedbench from), or register it with
``@DATASETS.register("my_set")`` in a module your code imports."""


@dataclass(frozen=True)
class TorchvisionSource:
    """A data set torchvision reads, and the files it needs (checked before training)."""

    name: str
    torchvision_class: str
    num_classes: int
    native_channels: int
    native_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool
    files: tuple[str, ...]
    archive_md5: tuple[tuple[str, str], ...] = ()

    @property
    def mnist_family(self) -> bool:
        return self.native_channels == 1

    def read(self, root: Path, train: bool, download: bool) -> LabelledImages:
        images = _as_uint8_nchw(_torchvision_dataset(self, root, train, download))
        return LabelledImages(images.images, images.labels, self.num_classes, self.mean, self.std, self.hflip)


def _mnist_files(folder: str, md5s: tuple[tuple[str, str], ...]) -> tuple[str, ...]:
    return tuple(f"{folder}/raw/{name}" for name, _ in md5s)


_FASHION_MD5 = (
    ("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
    ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
    ("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
    ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),
)
_MNIST_MD5 = (
    ("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
    ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
    ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
    ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
)
_MNIST_MEAN, _MNIST_STD = (0.1307,), (0.3081,)

FASHION_MNIST = TorchvisionSource(
    "fashion_mnist", "FashionMNIST", 10, 1, 28, _MNIST_MEAN, _MNIST_STD, False,
    _mnist_files("FashionMNIST", _FASHION_MD5), _FASHION_MD5,
)
MNIST = TorchvisionSource(
    "mnist", "MNIST", 10, 1, 28, _MNIST_MEAN, _MNIST_STD, False, _mnist_files("MNIST", _MNIST_MD5), _MNIST_MD5
)
CIFAR10 = TorchvisionSource(
    "cifar10", "CIFAR10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2615), True,
    tuple(f"cifar-10-batches-py/{n}" for n in ["data_batch_1", "data_batch_2", "data_batch_3",
                                               "data_batch_4", "data_batch_5", "test_batch", "batches.meta"]),
)
CIFAR100 = TorchvisionSource(
    "cifar100", "CIFAR100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), True,
    ("cifar-100-python/train", "cifar-100-python/test", "cifar-100-python/meta"),
)


# the data set functions torchvision_data_set made: their files are read once per process (load_split)
_BUILT_IN: set[DataSetFunction] = set()


def torchvision_data_set(source: TorchvisionSource, doc: str) -> DataSetFunction:
    """A data set function reading ``source`` through torchvision; ``.source`` lets the
    config check name missing files before any training."""

    def read(root: Path, train: bool, download: bool) -> LabelledImages:
        return read.source.read(root, train, download)

    read.source = source  # type: ignore[attr-defined]
    read.__doc__ = doc
    _BUILT_IN.add(read)
    return read


fashion_mnist = DATASETS.register("fashion_mnist")(torchvision_data_set(
    FASHION_MNIST, "Fashion-MNIST: 60k/10k grey 28x28, 10 classes; MNIST's mean/std as the published code."))
mnist = DATASETS.register("mnist")(torchvision_data_set(MNIST, "MNIST: 60k/10k grey 28x28, 10 classes."))
cifar10 = DATASETS.register("cifar10")(torchvision_data_set(CIFAR10, "CIFAR-10: 50k/10k colour 32x32, 10 classes."))
cifar100 = DATASETS.register("cifar100")(torchvision_data_set(
    CIFAR100, "CIFAR-100: 50k/10k colour 32x32, 100 (fine) classes."))


@dataclass
class DataConfig:
    """Which data set, where it lives, and how it is split and transformed.

    Args:
        name: a registered data set: fashion_mnist, mnist, cifar10, cifar100, or your own.
        root: folder in torchvision's layout; else $FEDBENCH_DATA; else ./data.
        download: let torchvision download missing files (needs internet).
        image_size: side of the model input; None = 32 (MNIST-family is resized to 32x32 as in the papers).
        channels: model input channels; None = 3 (grey images are repeated to 3 channels as in the papers).
        augment: random crop with zero padding (and flip where it makes sense) during local training.
        hflip: horizontal flip; None = the data set's default (CIFAR yes, MNIST family no).
        crop_padding: padding of the random crop, in pixels.
        server_fraction: share of the training set (its tail, in file order) held by the server.
        server_size: keep only this many (seeded choice) of the server's split; None = all of it.
        train_subset: use only this many (seeded choice) of the clients' pool; None = all (for quick CPU runs).
        test_subset: evaluate on this many (seeded choice) test images; None = the whole test set.
    """

    name: str = "fashion_mnist"
    root: str | None = None
    download: bool = True
    image_size: int | None = None
    channels: int | None = None
    augment: bool = True
    hflip: bool | None = None
    crop_padding: int = 4
    server_fraction: float = 0.1
    server_size: int | None = None
    train_subset: int | None = None
    test_subset: int | None = None

    def problems(self) -> list[Problem]:
        found = Problems(DATASETS.problems("data.name", self.name))
        known = not found
        found.need(0 < self.server_fraction < 1, "data.server_fraction", self.server_fraction, "a fraction in (0, 1)")
        for name in ("server_size", "train_subset", "test_subset"):
            value = getattr(self, name)
            found.need(value is None or value >= 1, f"data.{name}", value, "None (all) or an integer >= 1")
        found.need(self.image_size is None or self.image_size >= 8, "data.image_size", self.image_size, "None or >= 8")
        found.need(self.channels in (None, 1, 3), "data.channels", self.channels, "None, 1 or 3")
        found.need(self.crop_padding >= 0, "data.crop_padding", self.crop_padding, "an integer >= 0")
        if known:
            found.extend(data_problems(self))
        return found


@dataclass
class ImageSet:
    """Images as uint8 ``[N, C, H, W]`` and labels as int64 ``[N]``, on one device."""

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: Tensor) -> "ImageSet":
        return ImageSet(self.images[index], self.labels[index])

    def to(self, device: torch.device | str) -> "ImageSet":
        return ImageSet(self.images.to(device), self.labels.to(device))


@dataclass
class FederatedData:
    """What the engine needs: the clients' pool, the server's split, the test set."""

    num_classes: int
    client_pool: ImageSet
    server: ImageSet
    test: ImageSet
    pipeline: "ImagePipeline"


def resolve_root(root: str | None) -> Path:
    """Config first, then $FEDBENCH_DATA, then ./data."""
    return Path(root or os.environ.get("FEDBENCH_DATA") or "data").expanduser()


def _cache_root() -> Path:
    return Path(os.environ.get("FEDBENCH_CACHE", "~/.cache/fedbench")).expanduser() / "data"


def _missing_message(spec: TorchvisionSource, root: Path, reason: str) -> str:
    files = "\n".join(f"  {root / f}" for f in spec.files)
    alternative = ""
    if spec.name == "cifar10":
        alternative = f"\n(or the archive {root / 'cifar-10-python.tar.gz'})"
    elif spec.name == "cifar100":
        alternative = f"\n(or the archive {root / 'cifar-100-python.tar.gz'})"
    return (
        f"data set {spec.name!r} not found under {root} and not downloadable ({reason}).\n"
        f"Put these files there (torchvision's layout), or set data.root / $FEDBENCH_DATA to a folder "
        f"that has them:\n{files}{alternative}"
    )


def data_problems(config: DataConfig) -> list[tuple[str, object, str]]:
    """Missing data found before any training: only when downloading is off (with it on,
    a failed download is reported when loading)."""
    spec = getattr(DATASETS.resolve(config.name), "source", None)
    if config.download or spec is None:  # a user's data set checks its own files when read
        return []
    root = resolve_root(config.root)
    cached = _cache_root()

    def present(relative: str) -> bool:
        unpacked = relative[: -len(".gz")] if relative.endswith(".gz") else relative
        return any((base / name).exists() for base in (root, cached) for name in (relative, unpacked))

    archive = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}.get(spec.name)
    if all(present(f) for f in spec.files) or (archive and (root / archive).exists()):
        return []
    missing = ", ".join(str(root / f) for f in spec.files if not present(f))
    return [("data.root", str(root), f"a folder holding {spec.name} in torchvision's layout; missing: {missing}")]


def _writable(path: Path) -> bool:
    """Writable, and not marked read-only: the mode bits count even for root, who may
    write anywhere, so that a shared read-only data folder is never modified."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    return os.access(probe, os.W_OK) and bool(probe.stat().st_mode & 0o222)


def _extract_mnist_archives(spec: TorchvisionSource, root: Path) -> Path | None:
    """Unpack the .gz files torchvision's MNIST reader needs, without any network.

    torchvision reads the unpacked idx files. When ``root`` holds only the .gz files
    (with the md5 torchvision checks) they are unpacked next to them, or, for a
    read-only root, into a cache folder that mirrors the layout; that folder is returned.
    """
    from torchvision.datasets.utils import check_integrity

    raw = root / spec.torchvision_class / "raw"
    if not all(check_integrity(str(raw / name), md5) for name, md5 in spec.archive_md5):
        return None
    target_root = root if _writable(raw) else _cache_root()
    target_raw = target_root / spec.torchvision_class / "raw"
    target_raw.mkdir(parents=True, exist_ok=True)
    for name, _ in spec.archive_md5:
        unpacked = target_raw / name[: -len(".gz")]
        if unpacked.exists():
            continue
        # Unpack to a private name, then rename: a crash never leaves a truncated file.
        partial = target_raw / f".{unpacked.name}.{os.getpid()}.partial"
        with gzip.open(raw / name, "rb") as source, open(partial, "wb") as sink:
            shutil.copyfileobj(source, sink)
        os.replace(partial, unpacked)
    return target_root


def _torchvision_dataset(spec: TorchvisionSource, root: Path, train: bool, download: bool):
    import torchvision.datasets as tvd

    cls = getattr(tvd, spec.torchvision_class)
    with contextlib.suppress(RuntimeError):
        return cls(str(root), train=train, download=False)
    if spec.mnist_family:
        prepared = _extract_mnist_archives(spec, root)
        if prepared is not None:
            return cls(str(prepared), train=train, download=False)
    if not download:
        raise DataNotFoundError(_missing_message(spec, root, "data.download is false"))
    if not _writable(root):
        raise DataNotFoundError(_missing_message(spec, root, "the folder is read-only"))
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return cls(str(root), train=train, download=True)
    except (URLError, OSError, RuntimeError, ValueError) as err:
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise DataNotFoundError(_missing_message(spec, root, f"download failed: {reason}")) from None
    finally:
        socket.setdefaulttimeout(previous_timeout)


def _as_uint8_nchw(dataset) -> ImageSet:
    data = dataset.data
    images = torch.as_tensor(data)
    if images.ndim == 3:  # MNIST family: [N, H, W]
        images = images.unsqueeze(1)
    else:  # CIFAR: numpy [N, H, W, C]
        images = images.permute(0, 3, 1, 2)
    labels = torch.as_tensor(dataset.targets, dtype=torch.int64)
    return ImageSet(images.contiguous(), labels)


def _resize(images: Tensor, size: int) -> Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    resized = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return resized.round().clamp_(0, 255).to(torch.uint8)


def load_split(name: str, root: Path, train: bool, download: bool, image_size: int) -> LabelledImages:
    """One split at ``image_size``, in tensors of its own. The files of a built-in data set
    (:func:`torchvision_data_set`) are read and resized once per process for each root,
    split and size while they stay unchanged: a grid's pack builds its cells one after
    another from the same files, 0.7 s a Fashion-MNIST cell on this project's CPU, most of
    it resizing. Any other data set function is called every time."""
    read = DATASETS.resolve(name)
    if read not in _BUILT_IN:
        return _resized(read(root, train, download), image_size)
    split = _cached_split(read, Path(root), train, download, image_size)
    return dataclasses.replace(split, images=split.images.clone(), labels=split.labels.clone())


def _resized(split: LabelledImages, image_size: int) -> LabelledImages:
    return dataclasses.replace(split, images=_resize(split.images, image_size))  # the function's object untouched


# (function, its source, resolved root, train, download, size) -> (the files' stamps, the split)
_SPLITS: collections.OrderedDict[tuple, tuple[tuple, LabelledImages]] = collections.OrderedDict()
_SPLITS_KEPT = 8  # at most, the least recently used dropped first (Fashion-MNIST at 32 px: 71 MB a train+test pair)


def _cached_split(read: DataSetFunction, root: Path, train: bool, download: bool, image_size: int) -> LabelledImages:
    """The resized split, from :data:`_SPLITS` while the data set's files have the stamps it
    was read with; otherwise read, and kept with the stamps taken after the read (a first
    read may unpack archives into the folder it stamps). Kept by the resolved root: a
    relative root means another folder after a change of working folder."""
    where = root.resolve()
    key = (read, read.source, where, train, download, image_size)
    try:
        hash(key)
    except TypeError:  # a source built with lists: read every time
        return _resized(read(root, train, download), image_size)
    kept = _SPLITS.get(key)
    if kept is not None and kept[0] == _file_stamps(read.source, where):
        _SPLITS.move_to_end(key)
        return kept[1]
    split = _resized(read(root, train, download), image_size)
    _SPLITS[key] = (_file_stamps(read.source, where), split)
    _SPLITS.move_to_end(key)
    while len(_SPLITS) > _SPLITS_KEPT:
        _SPLITS.popitem(last=False)
    return split


def _file_stamps(source: TorchvisionSource, root: Path) -> tuple[tuple[str, int, int], ...]:
    """(path, size, modification time) of every file in the data set's folders under
    ``root``, through symbolic links (a shared data folder is often linked in)."""
    stamps = []
    for folder in sorted({Path(f).parts[0] for f in source.files}):
        for directory, subfolders, files in os.walk(root / folder, followlinks=True):
            subfolders.sort()
            for name in sorted(files):
                path = os.path.join(directory, name)
                try:
                    stat = os.stat(path)
                except OSError:  # a broken link: stamped as missing
                    stamps.append((path, -1, -1))
                    continue
                stamps.append((path, stat.st_size, stat.st_mtime_ns))
    return tuple(stamps)


def _seeded_subset(n: int, size: int | None, seed: int, key: int) -> Tensor | None:
    if size is None or size >= n:
        return None
    generator = torch_generator(seed, "server_split", key)
    return torch.randperm(n, generator=generator)[:size].sort().values


def load_federated_data(config: DataConfig, seed: int, device: torch.device | str = "cpu") -> FederatedData:
    """Read a data set once, split it as the papers do, and put it on ``device``."""
    root = resolve_root(config.root)
    size = config.image_size or 32
    train_split = load_split(config.name, root, True, config.download, size)
    test_split = load_split(config.name, root, False, config.download, size)
    train = ImageSet(train_split.images, train_split.labels)
    test = ImageSet(test_split.images, test_split.labels)

    n_server = int(round(len(train) * config.server_fraction))
    n_clients = len(train) - n_server
    client_pool = train.subset(torch.arange(n_clients))
    server = train.subset(torch.arange(n_clients, len(train)))
    if (index := _seeded_subset(len(server), config.server_size, seed, 0)) is not None:
        server = server.subset(index)
    if (index := _seeded_subset(len(client_pool), config.train_subset, seed, 1)) is not None:
        client_pool = client_pool.subset(index)
    if (index := _seeded_subset(len(test), config.test_subset, seed, 2)) is not None:
        test = test.subset(index)

    pipeline = ImagePipeline(
        mean=train_split.mean,
        std=train_split.std,
        channels=config.channels or 3,
        augment=config.augment,
        hflip=train_split.hflip if config.hflip is None else config.hflip,
        crop_padding=config.crop_padding,
        device=device,
    )
    return FederatedData(train_split.num_classes, client_pool.to(device), server.to(device), test.to(device), pipeline)


@dataclass(frozen=True)
class Augmentation:
    """Random draws of N training samples (a batch, or an epoch's batches): crop offsets
    ``[2, N]`` (row, column) and flip flags ``[N]``, each None where the pipeline does not
    draw it."""

    offsets: Tensor | None
    flips: Tensor | None

    @staticmethod
    def concat(draws: list[Augmentation | None]) -> Augmentation | None:
        """Several batches' draws as one (batches in the given order)."""
        if not draws or draws[0] is None:
            return None
        offsets = None if draws[0].offsets is None else torch.cat([d.offsets for d in draws], dim=1)
        flips = None if draws[0].flips is None else torch.cat([d.flips for d in draws])
        return Augmentation(offsets, flips)

    def slice(self, start: int, stop: int) -> Augmentation:
        """The draws of samples ``start:stop``."""
        return Augmentation(None if self.offsets is None else self.offsets[:, start:stop],
                            None if self.flips is None else self.flips[start:stop])


class ImagePipeline:
    """uint8 batch -> normalised float model input, batched on the batch's device.

    Training: scale to [0, 1], random crop of the original size from the image padded
    with ``crop_padding`` zeros (torchvision's ``RandomCrop(size, padding)``), optional
    horizontal flip with probability 1/2, per-channel normalisation, grey repeated to
    ``channels``. Evaluation: the same without crop and flip.
    """

    def __init__(
        self,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        channels: int,
        augment: bool,
        hflip: bool,
        crop_padding: int,
        device: torch.device | str = "cpu",
    ) -> None:
        if len(mean) == 1:
            mean, std = mean * channels, std * channels
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.channels = channels
        self.augment = augment
        self.hflip = hflip
        self.crop_padding = crop_padding

    def __call__(self, images: Tensor, generator: torch.Generator | None = None, train: bool = False) -> Tensor:
        draws = self.draw_epoch([images.shape[0]], images.device, generator) if train else None
        return self.apply(images, draws)

    def draw_epoch(self, sizes: list[int], device: torch.device,
                   generator: torch.Generator | None) -> Augmentation | None:
        """An epoch's draws, made at its start, for batches of ``sizes`` in turn, as one
        Augmentation over its samples (batch after batch): every batch's crop offsets (the
        full batches' in one call, then a shorter last batch's), then every sample's flip.
        On a CPU generator, without flips, these are the numbers that per-batch draws gave
        in earlier versions; with flips, whose draws used to interleave with the offsets
        batch by batch, the stream differs from versions before this one. None when nothing
        is random."""
        if not self.augment or not sizes:
            return None
        full, total = sizes[0], sum(sizes)
        whole = len(sizes) if sizes[-1] == full else len(sizes) - 1
        offsets = None
        if self.crop_padding > 0:
            span = 2 * self.crop_padding + 1
            parts = [torch.randint(0, span, (whole, 2, full), device=device, generator=generator)
                     .permute(1, 0, 2).reshape(2, whole * full)]
            if whole < len(sizes):
                parts.append(torch.randint(0, span, (2, sizes[-1]), device=device, generator=generator))
            offsets = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        flips = torch.rand(total, device=device, generator=generator) < 0.5 if self.hflip else None
        return Augmentation(offsets, flips)

    def apply(self, images: Tensor, draws: Augmentation | None) -> Tensor:
        """The pipeline with these draws (None: evaluation). Every step is per image, so one
        call over several clients' batches (their draws concatenated) gives each client's
        batch bit for bit (the cohort builds its inputs this way)."""
        x = images.float().div_(255.0)
        if draws is not None and draws.offsets is not None:
            x = crop(x, self.crop_padding, draws.offsets)
        if draws is not None and draws.flips is not None:
            x = torch.where(draws.flips.view(-1, 1, 1, 1), x.flip(3), x)
        if x.shape[1] != self.channels:
            x = x.expand(-1, self.channels, -1, -1)
        return (x - self.mean) / self.std

    def normalize(self, raw: Tensor) -> Tensor:
        """Raw [0, 1] pixel values -> model-input space, per channel."""
        return (raw - self.mean) / self.std


def random_crop(x: Tensor, padding: int, generator: torch.Generator | None) -> Tensor:
    """Batched ``RandomCrop(size, padding)``: one offset per image, zero padding."""
    return crop(x, padding, torch.randint(0, 2 * padding + 1, (2, x.shape[0]), device=x.device, generator=generator))


def crop(x: Tensor, padding: int, offsets: Tensor) -> Tensor:
    """Image i's window at (row, column) ``offsets[:, i]`` of the image zero-padded by ``padding``."""
    b, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    rows = offsets[0].unsqueeze(1) + torch.arange(h, device=x.device)
    cols = offsets[1].unsqueeze(1) + torch.arange(w, device=x.device)
    batch = torch.arange(b, device=x.device).view(b, 1, 1)
    # Advanced indices separated by a slice put their dims first: result is [B, H, W, C].
    cropped = padded[batch, :, rows.unsqueeze(2), cols.unsqueeze(1)]
    return cropped.permute(0, 3, 1, 2)
