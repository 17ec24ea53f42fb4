import dataclasses
import stat
import urllib.request
from pathlib import Path
from urllib.error import URLError

import pytest
import torch

from conftest import md5, patch_cifar_md5, real_data_root, write_cifar, write_mnist_like
from fedbench.data import DATASETS, DataConfig, ImagePipeline, load_federated_data, random_crop, resolve_root
from fedbench.errors import DataNotFoundError


def test_fashion_mnist_is_split_9_to_1_resized_and_on_device(tiny_root):
    loaded = load_federated_data(DataConfig(root=str(tiny_root), download=False), seed=0)
    assert loaded.client_pool.images.shape == (1080, 1, 32, 32)
    assert loaded.server.images.shape == (120, 1, 32, 32)
    assert loaded.test.images.shape == (300, 1, 32, 32)
    assert loaded.client_pool.images.dtype == torch.uint8
    # The server holds the tail of the training set in file order, as the published code.
    import torchvision

    raw = torchvision.datasets.FashionMNIST(str(tiny_root), train=True)
    assert torch.equal(loaded.server.labels, raw.targets[1080:])
    assert torch.equal(loaded.client_pool.labels, raw.targets[:1080])
    inputs = loaded.pipeline(loaded.test.images[:4])
    assert inputs.shape == (4, 3, 32, 32)
    expected = (loaded.test.images[:4].float() / 255 - 0.1307) / 0.3081
    assert torch.allclose(inputs, expected.expand(-1, 3, -1, -1))


def test_server_size_and_subsets_are_seeded_choices(tiny_root):
    config = DataConfig(root=str(tiny_root), download=False, server_size=16, train_subset=500, test_subset=100)
    a = load_federated_data(config, seed=1)
    b = load_federated_data(config, seed=1)
    assert (len(a.server), len(a.client_pool), len(a.test)) == (16, 500, 100)
    assert torch.equal(a.server.images, b.server.images) and torch.equal(a.client_pool.labels, b.client_pool.labels)


def test_native_size_and_channels_are_options(tiny_root):
    loaded = load_federated_data(DataConfig(name="mnist", root=str(tiny_root), image_size=28, channels=1), seed=0)
    assert loaded.client_pool.images.shape[1:] == (1, 28, 28)
    assert loaded.pipeline(loaded.test.images[:2]).shape == (2, 1, 28, 28)


@pytest.mark.parametrize("kind,num_classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_loads_through_torchvision_from_files_in_its_format(tmp_path, monkeypatch, kind, num_classes):
    md5s = write_cifar(tmp_path, kind, n_per_file=40)
    patch_cifar_md5(monkeypatch, kind, md5s)
    loaded = load_federated_data(DataConfig(name=kind, root=str(tmp_path), download=False), seed=0)
    n_train = 40 * (5 if kind == "cifar10" else 1)
    assert len(loaded.client_pool) + len(loaded.server) == n_train
    assert loaded.test.images.shape == (40, 3, 32, 32)
    assert loaded.num_classes == num_classes
    assert loaded.pipeline.hflip  # flips make sense for CIFAR, not for digits
    import pickle

    first = pickle.loads((tmp_path / ("cifar-10-batches-py/data_batch_1" if kind == "cifar10"
                                      else "cifar-100-python/train")).read_bytes())
    assert torch.equal(loaded.client_pool.images[0], torch.as_tensor(first["data"][0]).view(3, 32, 32))


def test_gz_only_read_only_root_is_unpacked_into_the_cache(tmp_path, monkeypatch):
    root = tmp_path / "readonly"
    write_mnist_like(root, "FashionMNIST", 200, 50, gz=True)
    raw = root / "FashionMNIST" / "raw"
    read = DATASETS.get("fashion_mnist")
    spec = dataclasses.replace(read.source, archive_md5=tuple(
        (name, md5(raw / name)) for name, _ in read.source.archive_md5))
    monkeypatch.setattr(read, "source", spec)
    monkeypatch.setenv("FEDBENCH_CACHE", str(tmp_path / "cache"))
    for path in [raw, *raw.iterdir()]:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        loaded = load_federated_data(DataConfig(root=str(root), download=False), seed=0)
        assert len(loaded.client_pool) + len(loaded.server) == 200
        assert sorted(p.name for p in raw.iterdir()) == sorted(n for n, _ in spec.archive_md5), "root untouched"
        assert (tmp_path / "cache" / "data" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").exists()
    finally:
        for path in [raw, *raw.iterdir()]:
            path.chmod(path.stat().st_mode | stat.S_IWUSR)


def test_missing_data_without_download_names_every_file(tmp_path):
    with pytest.raises(DataNotFoundError) as caught:
        load_federated_data(DataConfig(root=str(tmp_path), download=False), seed=0)
    message = str(caught.value)
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz"):
        assert str(tmp_path / "FashionMNIST" / "raw" / name) in message
    assert "FEDBENCH_DATA" in message


def test_missing_data_with_no_network_is_one_message_not_a_urllib_traceback(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise URLError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    with pytest.raises(DataNotFoundError) as caught:
        load_federated_data(DataConfig(name="cifar10", root=str(tmp_path), download=True), seed=0)
    message = str(caught.value)
    assert "download failed" in message and "cifar-10-batches-py/data_batch_1" in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_root_comes_from_config_then_environment_then_default(monkeypatch):
    monkeypatch.setenv("FEDBENCH_DATA", "/from/env")
    assert resolve_root("/from/config") == Path("/from/config")
    assert resolve_root(None) == Path("/from/env")
    monkeypatch.delenv("FEDBENCH_DATA")
    assert resolve_root(None) == Path("data")


def test_random_crop_takes_a_window_of_the_zero_padded_image():
    x = torch.rand(16, 3, 8, 8)
    out = random_crop(x, 2, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    offsets_seen = set()
    for i in range(16):
        matches = [(r, c) for r in range(5) for c in range(5) if torch.equal(out[i], padded[i, :, r:r + 8, c:c + 8])]
        assert matches, f"image {i} is not a window of its padded original"
        offsets_seen.update(matches)
    assert len(offsets_seen) > 3, "offsets vary across the batch"


def test_pipeline_flips_only_when_asked_and_only_in_training():
    pipeline = ImagePipeline((0.0,), (1.0,), channels=1, augment=True, hflip=True, crop_padding=0)
    images = torch.arange(2 * 4 * 4, dtype=torch.uint8).view(2, 1, 4, 4).repeat(32, 1, 1, 1)
    train = pipeline(images, torch.Generator().manual_seed(0), train=True)
    plain = images.float() / 255
    flipped = [torch.equal(t, p.flip(-1)) for t, p in zip(train, plain)]
    kept = [torch.equal(t, p) for t, p in zip(train, plain)]
    assert all(f or k for f, k in zip(flipped, kept)) and 10 < sum(flipped) < 54
    assert torch.equal(pipeline(images, train=False), plain)


@pytest.mark.skipif(real_data_root() is None, reason="no real Fashion-MNIST copy on this machine")
def test_real_fashion_mnist_and_mnist_load_from_the_shared_copy(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDBENCH_CACHE", str(tmp_path / "cache"))
    for name in ("fashion_mnist", "mnist"):
        loaded = load_federated_data(DataConfig(name=name, root=str(real_data_root()), download=False), seed=0)
        assert (len(loaded.client_pool), len(loaded.server), len(loaded.test)) == (54000, 6000, 10000)
        counts = torch.bincount(torch.cat([loaded.client_pool.labels, loaded.server.labels]), minlength=10)
        if name == "fashion_mnist":
            assert counts.tolist() == [6000] * 10
        assert loaded.client_pool.images.shape[1:] == (1, 32, 32)


def counted_reads(monkeypatch) -> list[bool]:
    """The splits (train: True) the built-in data sets read from their files from now on."""
    from fedbench import data

    reads: list[bool] = []
    real_read = data.TorchvisionSource.read
    monkeypatch.setattr(data.TorchvisionSource, "read",
                        lambda self, root, train, download: reads.append(train) or real_read(self, root, train, download))
    data._SPLITS.clear()
    return reads


def written_test_split(seed: int, n: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """The test images and labels write_mnist_like(..., seed) wrote (conftest's generator)."""
    from conftest import synthetic_images

    images, labels = synthetic_images(n, 10, 28, 1, seed + 1)
    return torch.as_tensor(images), torch.as_tensor(labels).long()


def test_a_process_reads_a_data_set_s_files_once_while_they_stay_unchanged(tmp_path, monkeypatch):
    """A grid's pack builds each of its cells from the same files: each split read once,
    every run still gets tensors of its own, another size or a touched file is read anew."""
    import os

    write_mnist_like(tmp_path, "FashionMNIST", 200, 50)
    reads = counted_reads(monkeypatch)
    config = DataConfig(root=str(tmp_path), download=False, image_size=28)  # 28: the files' own pixels
    first, second = load_federated_data(config, seed=0), load_federated_data(config, seed=0)
    assert reads == [True, False], "each split read once for both runs"
    images, labels = written_test_split(seed=0)
    for loaded in (first, second):
        assert torch.equal(loaded.test.images, images) and torch.equal(loaded.test.labels, labels)
    second.test.images.zero_()  # a run that changed its tensors in place changes nobody else's
    second.test.labels.zero_()
    third = load_federated_data(config, seed=0)
    assert torch.equal(third.test.images, images) and torch.equal(third.test.labels, labels)
    assert torch.equal(third.client_pool.images, first.client_pool.images) and reads == [True, False]

    load_federated_data(DataConfig(root=str(tmp_path), download=False, image_size=32), seed=0)
    assert reads == [True, False] * 2, "another size: read again"
    test_images = tmp_path / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte"
    os.utime(test_images, ns=(test_images.stat().st_atime_ns, test_images.stat().st_mtime_ns + 10**9))
    load_federated_data(config, seed=0)
    assert reads == [True, False] * 3, "a file changed: both splits read again"


def test_files_behind_a_symbolic_link_or_another_working_folder_are_not_served_stale(tmp_path, monkeypatch):
    import os

    reads = counted_reads(monkeypatch)
    # a shared data folder linked in: rewritten behind the link, it is read anew
    store, linked = tmp_path / "store", tmp_path / "linked"
    write_mnist_like(store, "FashionMNIST", 200, 50, seed=0)
    (linked / "FashionMNIST").mkdir(parents=True)
    (linked / "FashionMNIST" / "raw").symlink_to(store / "FashionMNIST" / "raw")
    config = DataConfig(root=str(linked), download=False, image_size=28)
    assert torch.equal(load_federated_data(config, seed=0).test.images, written_test_split(seed=0)[0])
    write_mnist_like(store, "FashionMNIST", 200, 50, seed=7)  # same sizes, other images
    assert torch.equal(load_federated_data(config, seed=0).test.images, written_test_split(seed=7)[0])

    # the same relative root in two working folders, files of equal size and time: two data sets
    for folder, seed in (("a", 0), ("b", 7)):
        write_mnist_like(tmp_path / folder / "data", "FashionMNIST", 200, 50, seed=seed)
        for path in (tmp_path / folder / "data" / "FashionMNIST" / "raw").iterdir():
            os.utime(path, ns=(10**18, 10**18))
    relative = DataConfig(root="data", download=False, image_size=28)
    for folder, seed in (("a", 0), ("b", 7)):
        monkeypatch.chdir(tmp_path / folder)
        assert torch.equal(load_federated_data(relative, seed=0).test.images, written_test_split(seed=seed)[0])


def test_archives_a_first_read_unpacks_beside_themselves_do_not_make_it_read_again(tmp_path, monkeypatch):
    from conftest import md5

    write_mnist_like(tmp_path, "FashionMNIST", 200, 50, gz=True)
    raw = tmp_path / "FashionMNIST" / "raw"
    read = DATASETS.get("fashion_mnist")
    monkeypatch.setattr(read, "source", dataclasses.replace(read.source, archive_md5=tuple(
        (name, md5(raw / name)) for name, _ in read.source.archive_md5)))
    reads = counted_reads(monkeypatch)
    config = DataConfig(root=str(tmp_path), download=False, image_size=28)
    load_federated_data(config, seed=0)
    assert (raw / "train-images-idx3-ubyte").exists(), "the first read unpacked the archives"
    loaded = load_federated_data(config, seed=0)
    assert reads == [True, False]
    assert torch.equal(loaded.test.images, written_test_split(seed=0)[0])


def test_a_data_set_function_of_one_s_own_is_called_every_time(tmp_path, monkeypatch):
    """Only the built-in data sets are kept: a function wrapping one (functools.wraps copies
    its ``source``) may draw, or read files no stamp covers."""
    import functools

    write_mnist_like(tmp_path, "FashionMNIST", 200, 50)
    built_in = DATASETS.get("fashion_mnist")
    calls = []

    @functools.wraps(built_in)
    def mine(root, train, download):
        calls.append(train)
        return built_in(root, train, download)

    monkeypatch.setitem(DATASETS._entries, "mine_wrapped", mine)
    config = DataConfig(name="mine_wrapped", root=str(tmp_path), download=False, image_size=28)
    for _ in range(2):
        load_federated_data(config, seed=0)
    assert calls == [True, False, True, False]


def test_a_built_in_source_that_cannot_be_a_key_is_read_every_time(tmp_path, monkeypatch):
    """torchvision_data_set is public: a source built with lists (unhashable) still loads,
    read each time rather than kept."""
    from fedbench import data

    write_mnist_like(tmp_path, "FashionMNIST", 200, 50)
    listed = dataclasses.replace(data.FASHION_MNIST, mean=list(data.FASHION_MNIST.mean))
    monkeypatch.setitem(DATASETS._entries, "listed_fashion", data.torchvision_data_set(listed, "lists"))
    reads = counted_reads(monkeypatch)
    config = DataConfig(name="listed_fashion", root=str(tmp_path), download=False, image_size=28)
    for _ in range(2):
        assert torch.equal(load_federated_data(config, seed=0).test.images, written_test_split(seed=0)[0])
    assert reads == [True, False, True, False] and not data._SPLITS
