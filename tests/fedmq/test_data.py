"""Data loaders on the real shared data, their errors, and the fixed splits and partitions."""

from __future__ import annotations

import gzip
import io
import re
from pathlib import Path

import numpy as np
import pytest

from fedmq import data
from fedmq.errors import ConfigError, DataError

# Label counts of the official MNIST test set (a property of the data set, not of our code).
MNIST_TEST_LABEL_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(scope="module")
def mnist() -> tuple[np.ndarray, np.ndarray]:
    return data.load_mnist_dir(data.shared_data_dir() / "mnist-t10k")


@pytest.fixture(scope="module")
def split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return data.mnist10k_split()


def test_shared_data_dir_defaults_to_the_folder_beside_the_project(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    # A project laid out in a temporary folder, so that the test holds wherever the checkout lies
    # (CI clones it with a shared/ beside it; a developer's clone may have none).
    monkeypatch.delenv("FEDMQ_SHARED_DATA", raising=False)
    project_root = tmp_path / "project"
    project_root.mkdir()
    monkeypatch.setattr(data, "_PROJECT_ROOT", project_root)
    # Resolved (a temporary folder may lie behind a symlink) and escaped (a path is no regular
    # expression: a checkout under "a+b" or "x (copy)" must match too).
    expected = (tmp_path / "shared" / "data").resolve()
    with pytest.raises(DataError, match=re.escape(str(expected))):
        data.shared_data_dir()
    expected.mkdir(parents=True)
    assert data.shared_data_dir() == expected


def test_shared_data_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FEDMQ_SHARED_DATA", str(tmp_path))
    assert data.shared_data_dir() == tmp_path
    missing = tmp_path / "nowhere"
    monkeypatch.setenv("FEDMQ_SHARED_DATA", str(missing))
    with pytest.raises(DataError, match=re.escape(str(missing))):
        data.shared_data_dir()


def test_mnist_test_set_loads(mnist: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = mnist
    assert x.shape == (10000, 1, 28, 28) and x.dtype == np.float32
    assert y.shape == (10000,) and y.dtype == np.int64
    assert x.min() == 0.0 and x.max() == 1.0
    assert np.bincount(y, minlength=10).tolist() == MNIST_TEST_LABEL_COUNTS


def test_uncompressed_idx_files_load_like_gzipped_ones(tmp_path: Path, mnist: tuple[np.ndarray, np.ndarray]) -> None:
    src = data.shared_data_dir() / "mnist-t10k"
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp_path / name).write_bytes(gzip.decompress((src / f"{name}.gz").read_bytes()))
    x, y = data.load_mnist_dir(tmp_path)
    assert np.array_equal(x, mnist[0]) and np.array_equal(y, mnist[1])


def test_mnist10k_split_is_the_readme_definition(mnist: tuple[np.ndarray, np.ndarray], split) -> None:
    x, y = mnist
    x_tr, y_tr, x_te, y_te = split
    perm = np.random.default_rng(0).permutation(10000)
    assert len(y_tr) == 8000 and len(y_te) == 2000
    assert np.array_equal(x_tr, x[perm[:8000]]) and np.array_equal(y_tr, y[perm[:8000]])
    assert np.array_equal(x_te, x[perm[8000:]]) and np.array_equal(y_te, y[perm[8000:]])
    # Together the two parts hold every image exactly once.
    assert np.array_equal(np.bincount(np.concatenate([y_tr, y_te]), minlength=10), np.bincount(y, minlength=10))


def test_mnist10k_iid_partition(split) -> None:
    parts = data.mnist10k_partitions(10, "iid")
    expected = np.array_split(np.random.default_rng(1).permutation(8000), 10)
    assert all(np.array_equal(a, b) for a, b in zip(parts, expected))
    assert [len(p) for p in parts] == [800] * 10
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(8000))


def _readme_dirichlet(labels: np.ndarray, k: int, alpha: float) -> list[list[int]]:
    rng = np.random.default_rng(2)
    clients: list[list[int]] = [[] for _ in range(k)]
    for c in range(10):
        positions = [i for i, label in enumerate(labels) if label == c]
        p = rng.dirichlet(alpha * np.ones(k))
        cuts = [0] + [int(np.floor(v * len(positions))) for v in np.cumsum(p)[:-1]] + [len(positions)]
        for j in range(k):
            clients[j].extend(positions[cuts[j]:cuts[j + 1]])
    return clients


@pytest.mark.parametrize("k,alpha", [(10, 0.5), (7, 0.1), (3, 5.0)])
def test_mnist10k_dirichlet_partition(split, k: int, alpha: float) -> None:
    y_tr = split[1]
    parts = data.mnist10k_partitions(k, "dirichlet", alpha, y_train=y_tr)
    assert len(parts) == k
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(8000))
    expected = _readme_dirichlet(y_tr, k, alpha)
    assert [sorted(p.tolist()) for p in parts] == [sorted(e) for e in expected]


def test_mnist10k_dirichlet_partition_loads_labels_itself(split) -> None:
    a = data.mnist10k_partitions(5, "dirichlet", 0.5)
    b = data.mnist10k_partitions(5, "dirichlet", 0.5, y_train=split[1])
    assert all(np.array_equal(p, q) for p, q in zip(a, b))


def test_small_alpha_skews_labels_more(split) -> None:
    y_tr = split[1]

    def mean_top_class_share(alpha: float) -> float:
        parts = data.partition(y_tr, 10, "dirichlet", alpha)
        return float(np.mean([np.bincount(y_tr[p], minlength=10).max() / len(p) for p in parts if len(p)]))

    assert mean_top_class_share(0.1) > mean_top_class_share(100.0) + 0.2


def test_partition_rejects_bad_arguments() -> None:
    labels = np.zeros(10, np.int64)
    with pytest.raises(ConfigError, match="scheme"):
        data.partition(labels, 2, "shards")
    with pytest.raises(ConfigError):
        data.partition_iid(10, 0, 1)
    with pytest.raises(ConfigError):
        data.partition_dirichlet(labels, 2, 0.0, 2)


def test_digits_load_and_split() -> None:
    x, y = data.load_digits()
    assert x.shape == (1797, 64) and x.dtype == np.float32 and y.dtype == np.int64
    assert x.min() == 0.0 and x.max() == 1.0
    x_tr, y_tr, x_te, y_te = data.load_split("digits")
    perm = np.random.default_rng(0).permutation(1797)
    assert (len(y_tr), len(y_te)) == (1437, 360)
    assert np.array_equal(x_tr, x[perm[:1437]]) and np.array_equal(y_te, y[perm[1437:]])
    parts = data.partition(y_tr, 10, "dirichlet", 0.5)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(1437))


def test_load_split_rejects_unknown_names() -> None:
    with pytest.raises(ConfigError, match="cifar"):
        data.load_split("cifar10")


def test_missing_mnist_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "t10k-images-idx3-ubyte.gz"))):
        data.load_mnist_dir(tmp_path)
    with pytest.raises(DataError, match=re.escape(str(tmp_path))):
        data.mnist10k_split(tmp_path)


def test_corrupt_gzip_names_the_path(tmp_path: Path) -> None:
    good = gzip.compress(b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + bytes(5))
    bad = tmp_path / "labels.gz"
    bad.write_bytes(good[:12] + b"garbage garbage garbage")
    with pytest.raises(DataError, match=re.escape(str(bad))):
        data.load_idx_labels(bad)


def test_idx_size_and_magic_checks(tmp_path: Path) -> None:
    ok = tmp_path / "ok"
    ok.write_bytes(b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + bytes([1, 2, 3, 4, 5]))
    assert data.load_idx_labels(ok).tolist() == [1, 2, 3, 4, 5]
    short = tmp_path / "short.gz"
    short.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + (6).to_bytes(4, "big") + bytes(5)))
    with pytest.raises(DataError, match=re.escape(str(short)) + ".*need 14 bytes"):
        data.load_idx_labels(short)
    with pytest.raises(DataError, match=re.escape(str(ok)) + ".*3"):
        data.load_idx_images(ok)  # a 1-dimensional file where images (3 dimensions) are expected
    junk = tmp_path / "junk"
    junk.write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(DataError, match=re.escape(str(junk)) + ".*magic"):
        data.load_idx_labels(junk)


def test_mnist_dir_rejects_count_mismatch(tmp_path: Path) -> None:
    (tmp_path / "t-images-idx3-ubyte").write_bytes(
        b"\x00\x00\x08\x03" + b"".join(d.to_bytes(4, "big") for d in (2, 28, 28)) + bytes(2 * 784))
    (tmp_path / "t-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01" + (3).to_bytes(4, "big") + bytes(3))
    with pytest.raises(DataError, match="2 images but .* 3 labels"):
        data.load_mnist_dir(tmp_path, prefix="t")


def test_npz_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "local.npz"
    x = np.random.default_rng(0).random((5, 3, 2))
    y = np.array([0, 1, 2, 1, 0], dtype=np.int32)
    data.save_npz_atomic(path, x, y)
    x2, y2 = data.load_npz(path)
    assert x2.dtype == np.float32 and y2.dtype == np.int64
    assert np.allclose(x2, x) and np.array_equal(y2, y)
    assert sorted(p.name for p in path.parent.iterdir()) == ["local.npz"]


def test_npz_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "missing.npz"
    with pytest.raises(DataError, match=re.escape(str(missing)) + ".*not found"):
        data.load_npz(missing)

    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04" + bytes(range(200)))
    with pytest.raises(DataError, match=re.escape(str(corrupt))):
        data.load_npz(corrupt)

    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, x=np.array([[1.0]]), y=np.array([{"evil": 1}], dtype=object))
    with pytest.raises(DataError, match=re.escape(str(pickled))):
        data.load_npz(pickled)

    no_y = tmp_path / "no_y.npz"
    np.savez(no_y, x=np.zeros((2, 2)))
    with pytest.raises(DataError, match=re.escape(str(no_y)) + ".*'y'"):
        data.load_npz(no_y)

    mismatch = tmp_path / "mismatch.npz"
    np.savez(mismatch, x=np.zeros((3, 2)), y=np.zeros(2, np.int64))
    with pytest.raises(DataError, match=re.escape(str(mismatch)) + ".*shape"):
        data.load_npz(mismatch)

    float_labels = tmp_path / "float_labels.npz"
    np.savez(float_labels, x=np.zeros((2, 2)), y=np.zeros(2))
    with pytest.raises(DataError, match=re.escape(str(float_labels)) + ".*integer"):
        data.load_npz(float_labels)

    nan = tmp_path / "nan.npz"
    np.savez(nan, x=np.full((2, 2), np.nan), y=np.zeros(2, np.int64))
    with pytest.raises(DataError, match=re.escape(str(nan)) + ".*NaN"):
        data.load_npz(nan)

    single = tmp_path / "single.npy"
    buf = io.BytesIO()
    np.save(buf, np.zeros(3))
    single.write_bytes(buf.getvalue())
    with pytest.raises(DataError, match=re.escape(str(single)) + ".*npz"):
        data.load_npz(single)
