import numpy as np
import pytest
import torch

from fedbench.errors import FedbenchError
from fedbench.partition import (PARTITIONS, PartitionConfig, class_counts, dirichlet_partition, partition_clients,
                                quantity_skew)


def labels_of(n: int = 3000, classes: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.as_tensor(np.random.default_rng(seed).integers(0, classes, n))


@pytest.mark.parametrize("scheme", PARTITIONS.names())
def test_every_sample_used_at_most_once_and_sizes_add_up(scheme):
    labels = labels_of()
    parts = partition_clients(labels, 10, PartitionConfig(scheme=scheme), seed=3)
    assert len(parts) == 10
    everything = torch.cat(parts)
    assert len(everything) == len(everything.unique()), "an index was given twice"
    assert len(everything) == len(labels), "every sample of the pool goes to a client"
    assert sum(sum(row) for row in class_counts(labels, parts, 10)) == len(labels)


def test_dirichlet_min_size_holds_even_when_skewed():
    labels = labels_of(600)
    for seed in range(5):
        parts = partition_clients(labels, 10, PartitionConfig(beta=0.1, min_size=20), seed=seed)
        assert min(len(p) for p in parts) >= 20


def test_dirichlet_impossible_min_size_is_a_clear_error():
    with pytest.raises(FedbenchError, match="min_size"):
        dirichlet_partition(np.zeros(50, dtype=int), 10, 0.5, 100, np.random.default_rng(0), max_draws=5)


def test_smaller_beta_means_more_label_skew():
    labels = labels_of(6000)

    def mean_classes_per_client(beta: float) -> float:
        values = []
        for seed in range(3):
            counts = np.array(class_counts(labels, partition_clients(labels, 10, PartitionConfig(beta=beta), seed), 10))
            shares = counts / counts.sum(axis=1, keepdims=True)
            # Effective number of classes per client: 1 / sum(p^2).
            values.append(float(np.mean(1.0 / (shares**2).sum(axis=1))))
        return float(np.mean(values))

    skewed, mild, near_iid = mean_classes_per_client(0.1), mean_classes_per_client(1.0), mean_classes_per_client(100.0)
    assert skewed < mild < near_iid
    assert near_iid > 9.0  # Dir(100) is close to uniform over the 10 classes


def test_shards_give_k_classes_per_client_on_sorted_balanced_labels():
    labels = torch.arange(10).repeat_interleave(100)  # 100 per class: each of 20 shards is one class
    parts = partition_clients(labels, 10, PartitionConfig(scheme="shards", shards_per_client=2), seed=0)
    for part in parts:
        assert len(part) == 100
        assert 1 <= len(labels[part].unique()) <= 2


def test_iid_parts_are_near_equal():
    parts = partition_clients(labels_of(1003), 10, PartitionConfig(scheme="iid"), seed=0)
    assert {len(p) for p in parts} == {100, 101}


def test_partition_is_seeded():
    labels = labels_of()
    a = partition_clients(labels, 10, PartitionConfig(), seed=7)
    b = partition_clients(labels, 10, PartitionConfig(), seed=7)
    c = partition_clients(labels, 10, PartitionConfig(), seed=8)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(len(x) == len(y) and torch.equal(x, y) for x, y in zip(a, c))


def test_quantity_skew_sizes_have_the_dirichlet_moments_and_labels_stay_iid():
    labels = labels_of(20000)
    config = PartitionConfig(scheme="quantity_skew", beta=0.5, min_size=1)
    shares = np.array([[len(p) / 20000 for p in quantity_skew(labels.numpy(), 10, config, np.random.default_rng(s))]
                       for s in range(400)])
    # Dir(0.5 * 1) over K = 10: every share has mean 1/K = 0.1 and variance
    # (1/K)(1 - 1/K) / (K * beta + 1) = 0.09 / 6 = 0.015 (std 0.1225).
    assert shares.mean() == pytest.approx(0.1, abs=1e-9), "shares of the whole pool"
    assert shares.std() == pytest.approx(0.015 ** 0.5, rel=0.08)
    parts = partition_clients(labels, 10, PartitionConfig(scheme="quantity_skew", beta=0.5, min_size=50), seed=1)
    assert min(len(p) for p in parts) >= 50
    overall = np.bincount(labels.numpy(), minlength=10) / len(labels)
    for part in parts:
        if len(part) >= 1000:
            share = np.bincount(labels.numpy()[part.numpy()], minlength=10) / len(part)
            assert np.abs(share - overall).max() < 0.05, "labels stay IID within a client"


def test_a_users_own_scheme_is_one_function_named_by_its_path(tmp_path, monkeypatch):
    (tmp_path / "my_schemes.py").write_text(
        "import numpy as np\n"
        "def halves(labels, num_clients, config, rng):\n"
        "    return np.array_split(np.arange(len(labels)), num_clients)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    parts = partition_clients(labels_of(100), 4, PartitionConfig(scheme="my_schemes.halves"), seed=0)
    assert [p.tolist() for p in parts] == [list(range(0, 25)), list(range(25, 50)), list(range(50, 75)),
                                           list(range(75, 100))]
    assert PartitionConfig(scheme="my_schemes.nothing").problems()[0][0] == "partition.scheme"
    assert PartitionConfig(scheme="zipf").problems()[0][2].startswith("one of: dirichlet, iid, quantity_skew, shards")
