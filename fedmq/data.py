"""Data sets: loaders, the MNIST-10k split, and IID / Dirichlet partitions over devices.

Every loader raises :class:`fedmq.errors.DataError` naming the file and what was expected
when a file is missing or corrupt. Nothing here unpickles: ``.npz`` files are read with
``allow_pickle=False`` and MNIST from its IDX format.

Splits (fixed so that every run, ours or a peer framework's, trains and tests on the same
samples):

* ``mnist10k``: exactly as ``../shared/data/README.md`` defines the "MNIST-10k split" of the
  official MNIST test set: ``default_rng(0).permutation(10000)``, train = first 8,000,
  test = last 2,000.
* ``digits``: scikit-learn's bundled 8x8 digits (1,797 samples, no download), pixels / 16;
  ``default_rng(0).permutation(1797)``, train = first ``floor(0.8 * 1797)`` = 1,437,
  test = the last 360.

Partitions over K devices (:func:`partition`) follow the README for every data set: IID is
``default_rng(1).permutation(n_train)`` cut by ``numpy.array_split`` into K pieces; non-IID
draws per class (0, 1, ... in order) proportions ``Dirichlet(alpha * ones(K))`` from
``default_rng(2)`` and cuts that class's train positions at ``floor(cumsum(p)[:-1] * n_c)``.
"""

from __future__ import annotations

import gzip
import io
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np

from fedmq.storage.atomic import atomic_write_bytes
from fedmq.errors import ConfigError, DataError

#: Environment variable naming the shared, read-only data folder.
SHARED_DATA_ENV = "FEDMQ_SHARED_DATA"
#: Folder of the MNIST test set inside the shared data folder.
MNIST_T10K_DIR = "mnist-t10k"
#: Seeds of the split and partitions (../shared/data/README.md).
SPLIT_SEED, IID_SEED, DIRICHLET_SEED = 0, 1, 2
MNIST10K_TRAIN = 8000
DIGITS_TRAIN_FRACTION = 0.8
DATASETS = ("digits", "mnist10k")
SCHEMES = ("iid", "dirichlet")

_PROJECT_ROOT = Path(__file__).resolve().parent.parent
# IDX type code 0x08 (unsigned byte) is the only one MNIST uses.
_IDX_UBYTE = 0x08


def shared_data_dir() -> Path:
    """The shared data folder: ``$FEDMQ_SHARED_DATA`` if set, else ``../shared/data``
    relative to the project root (the folder holding the ``fedmq`` package).

    Raises:
        DataError: the folder does not exist (the message names it and what it should hold).
    """
    env = os.environ.get(SHARED_DATA_ENV)
    path = Path(env) if env else (_PROJECT_ROOT.parent / "shared" / "data").resolve()
    if not path.is_dir():
        source = f"${SHARED_DATA_ENV}" if env else f"the default (no ${SHARED_DATA_ENV} set)"
        raise DataError(f"shared data folder {path} (from {source}) does not exist; expected a folder "
                        f"holding {MNIST_T10K_DIR}/t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz")
    return path


def _read_bytes(path: Path) -> bytes:
    """The file's content, gunzipped when it starts with the gzip magic number."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{path}: corrupt gzip data ({exc})") from None
    return raw


def _load_idx(path: str | os.PathLike[str], ndim: int) -> np.ndarray:
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic number; expected 0x0000{_IDX_UBYTE:02x}{ndim:02x})")
    if data[2] != _IDX_UBYTE or data[3] != ndim:
        raise DataError(f"{path}: IDX magic 0x{data[:4].hex()} says type 0x{data[2]:02x} with {data[3]} "
                        f"dimensions; expected unsigned byte (0x08) with {ndim}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header ({len(data)} bytes, expected at least {header})")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(data) != expected:
        raise DataError(f"{path}: IDX dimensions {dims} need {expected} bytes, file has {len(data)}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def load_idx_images(path: str | os.PathLike[str]) -> np.ndarray:
    """Images of an IDX3 file (gzip-compressed or not), e.g. ``t10k-images-idx3-ubyte.gz``.

    Returns:
        uint8 ``(N, rows, cols)``.

    Raises:
        DataError: missing file, bad gzip data, wrong magic number, or a size that does not
            match the dimensions in the header (message names the path).
    """
    return _load_idx(path, 3)


def load_idx_labels(path: str | os.PathLike[str]) -> np.ndarray:
    """Labels of an IDX1 file (gzip-compressed or not). Returns uint8 ``(N,)``.

    Raises:
        DataError: as :func:`load_idx_images`.
    """
    return _load_idx(path, 1)


def _find(folder: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"{folder / (stem + '.gz')}: file not found (nor {stem} uncompressed)")


def load_mnist_dir(folder: str | os.PathLike[str], prefix: str = "t10k") -> tuple[np.ndarray, np.ndarray]:
    """MNIST images and labels from ``{prefix}-images-idx3-ubyte[.gz]`` and
    ``{prefix}-labels-idx1-ubyte[.gz]`` in ``folder``.

    Returns:
        ``(x, y)``: x float32 ``(N, 1, 28, 28)`` = pixels / 255 (in [0, 1]); y int64 ``(N,)``
        in 0..9.

    Raises:
        DataError: a file is missing or corrupt, images are not 28x28, counts differ, or a
            label is outside 0..9 (message names the path).
    """
    folder = Path(folder)
    images_path = _find(folder, f"{prefix}-images-idx3-ubyte")
    labels_path = _find(folder, f"{prefix}-labels-idx1-ubyte")
    images = load_idx_images(images_path)
    labels = load_idx_labels(labels_path)
    if images.shape[1:] != (28, 28):
        raise DataError(f"{images_path}: images are {images.shape[1]}x{images.shape[2]}, expected 28x28")
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{images_path} has {images.shape[0]} images but {labels_path} has {labels.shape[0]} labels")
    if labels.size and labels.max() > 9:
        raise DataError(f"{labels_path}: label {int(labels.max())} outside 0..9")
    x = (images.astype(np.float32) / np.float32(255.0)).reshape(-1, 1, 28, 28)
    return x, labels.astype(np.int64)


def load_npz(path: str | os.PathLike[str], convert: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """A local data set from an ``.npz`` file with arrays ``x`` (samples) and ``y`` (labels),
    read without pickle.

    Args:
        convert: cast and check as class labels (below). False: x and y are returned with
            their stored dtypes (numeric, same length), for :meth:`fedmq.tasks.Task.check_data`
            to apply the task's rules (integer pixels, regression targets).

    Returns:
        ``(x, y)``: x float32 ``(N, ...)`` with at least 2 dimensions; y int64 ``(N,)``, >= 0.

    Raises:
        DataError: missing or unreadable file, not an npz archive, object arrays, missing
            keys, non-numeric or non-finite x, non-integer or negative y, or a length mismatch
            (message names the path).
    """
    path = Path(path)
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise DataError(f"{path}: a single .npy array, expected an .npz archive with arrays x and y")
        with archive:
            missing = [k for k in ("x", "y") if k not in archive.files]
            if missing:
                raise DataError(f"{path}: missing array(s) {missing}; expected keys 'x' and 'y', "
                                f"found {sorted(archive.files)}")
            x, y = archive["x"], archive["y"]
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        # np.load raises ValueError for pickled/object arrays and unknown formats.
        raise DataError(f"{path}: not a readable .npz archive of plain arrays ({exc})") from None
    if not convert:
        for name, arr in (("x", x), ("y", y)):
            if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
                raise DataError(f"{path}: {name} has dtype {arr.dtype}, expected a float or integer type")
        if x.ndim < 1 or y.ndim < 1 or x.shape[0] != y.shape[0]:
            raise DataError(f"{path}: expected x and y of the same length N, got x {x.shape} and y {y.shape}")
        return x, y
    if x.ndim < 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise DataError(f"{path}: expected x of shape (N, ...) and y of shape (N,), got x {x.shape} and y {y.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise DataError(f"{path}: x has dtype {x.dtype}, expected a float or integer type")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: y has dtype {y.dtype}, expected integer class labels")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise DataError(f"{path}: x contains NaN or infinite values")
    y = y.astype(np.int64, copy=False)
    if y.size and y.min() < 0:
        raise DataError(f"{path}: y contains negative label {int(y.min())}")
    return x, y


def save_npz_atomic(path: str | os.PathLike[str], x: np.ndarray, y: np.ndarray) -> None:
    """Write ``x`` and ``y`` to an ``.npz`` archive at exactly ``path`` (no suffix added),
    atomically (:func:`fedmq.storage.atomic.atomic_write_bytes`); :func:`load_npz` reads it back.

    Raises:
        DataError: ``x`` and ``y`` differ in length or ``y`` is not 1-dimensional.
        OSError: the file cannot be written (any old file is left intact).
    """
    x = np.asarray(x)
    y = np.asarray(y)
    if y.ndim != 1 or x.ndim < 1 or x.shape[0] != y.shape[0]:
        raise DataError(f"{path}: expected x (N, ...) and y (N,), got x {x.shape} and y {y.shape}")
    buf = io.BytesIO()
    np.savez(buf, x=x, y=y)
    atomic_write_bytes(path, buf.getvalue())


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 handwritten digits (bundled with scikit-learn, no download).

    Returns:
        ``(x, y)``: x float32 ``(1797, 64)`` = pixel / 16 in [0, 1]; y int64 ``(1797,)`` in 0..9.
    """
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    return (bunch.data / 16.0).astype(np.float32), bunch.target.astype(np.int64)


def _split(x: np.ndarray, y: np.ndarray, n_train: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(y))
    train, test = perm[:n_train], perm[n_train:]
    return x[train], y[train], x[test], y[test]


def mnist10k_split(data_dir: str | os.PathLike[str] | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The MNIST-10k split of ../shared/data/README.md: permutation
    ``default_rng(0).permutation(10000)`` of the official test set; train = its first 8,000
    indices, test = the last 2,000.

    Args:
        data_dir: the shared data folder (holding ``mnist-t10k/``) or a folder holding the
            t10k IDX files themselves; default :func:`shared_data_dir`.

    Returns:
        ``(x_train, y_train, x_test, y_test)``: x float32 ``(N, 1, 28, 28)`` in [0, 1], y int64;
        8,000 train and 2,000 test samples, train samples in permutation order.

    Raises:
        DataError: files missing or corrupt, or not 10,000 samples.
    """
    folder = Path(data_dir) if data_dir is not None else shared_data_dir()
    if not any((folder / f"t10k-images-idx3-ubyte{ext}").is_file() for ext in ("", ".gz")):
        folder = folder / MNIST_T10K_DIR
    x, y = load_mnist_dir(folder, prefix="t10k")
    if len(y) != 10000:
        raise DataError(f"{folder}: {len(y)} samples, expected the 10,000 of the MNIST test set")
    return _split(x, y, MNIST10K_TRAIN)


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train/test split of :func:`load_digits`: ``default_rng(0).permutation(1797)``, train =
    the first ``floor(0.8 * 1797)`` = 1,437 indices, test = the last 360.

    Returns:
        ``(x_train, y_train, x_test, y_test)``: x float32 ``(N, 64)``, y int64.
    """
    x, y = load_digits()
    return _split(x, y, int(np.floor(DIGITS_TRAIN_FRACTION * len(y))))


def load_split(name: str, data_dir: str | os.PathLike[str] | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_test, y_test)`` of data set ``name`` (``"digits"`` or
    ``"mnist10k"``; see :func:`digits_split`, :func:`mnist10k_split`).

    Raises:
        ConfigError: unknown name. DataError: files missing or corrupt.
    """
    if name == "digits":
        return digits_split()
    if name == "mnist10k":
        return mnist10k_split(data_dir)
    raise ConfigError(f"unknown data set {name!r}; expected one of {list(DATASETS)}")


def partition_iid(n: int, k: int, seed: int) -> list[np.ndarray]:
    """IID partition of positions ``0..n-1`` over ``k`` devices:
    ``numpy.array_split(default_rng(seed).permutation(n), k)``.

    Returns:
        ``k`` int64 arrays, disjoint, together covering every position exactly once; sizes
        differ by at most one.

    Raises:
        ConfigError: ``k < 1`` or ``n < 0``.
    """
    if k < 1 or n < 0:
        raise ConfigError(f"partition_iid: need k >= 1 devices and n >= 0 samples, got k={k}, n={n}")
    return [part.astype(np.int64) for part in np.array_split(np.random.default_rng(seed).permutation(n), k)]


def partition_dirichlet(labels: np.ndarray, k: int, alpha: float, seed: int,
                        num_classes: int | None = None) -> list[np.ndarray]:
    """Non-IID (label-skewed) partition over ``k`` devices with Dirichlet proportions
    (Hsu et al. 2019), as ../shared/data/README.md defines it: with one
    ``default_rng(seed)``, for each class c = 0, 1, ... in order, draw
    ``p ~ Dirichlet(alpha * ones(k))`` and cut that class's positions (in their order in
    ``labels``) at ``floor(cumsum(p)[:-1] * n_c)``; device j gets the j-th piece.

    Args:
        labels: int ``(n,)`` class labels of the train set.
        alpha: concentration, > 0; small values give more skew.
        num_classes: classes to draw for (default ``labels.max() + 1``); a class with no
            sample still consumes its draw so that the partition of the others does not move.

    Returns:
        ``k`` int64 arrays of positions into ``labels`` (each grouped by class in class
        order); disjoint and covering every position exactly once. Some may be empty.

    Raises:
        ConfigError: ``k < 1`` or ``alpha <= 0``.
    """
    labels = np.asarray(labels)
    if k < 1 or not alpha > 0:
        raise ConfigError(f"partition_dirichlet: need k >= 1 and alpha > 0, got k={k}, alpha={alpha}")
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if labels.size else 0
    rng = np.random.default_rng(seed)
    pieces: list[list[np.ndarray]] = [[] for _ in range(k)]
    for c in range(num_classes):
        positions = np.flatnonzero(labels == c)
        p = rng.dirichlet(alpha * np.ones(k))
        cuts = np.floor(np.cumsum(p)[:-1] * len(positions)).astype(np.int64)
        for j, piece in enumerate(np.split(positions, cuts)):
            pieces[j].append(piece)
    return [np.concatenate(p).astype(np.int64) if p else np.zeros(0, np.int64) for p in pieces]


def partition(labels: np.ndarray, k: int, scheme: str = "iid", alpha: float = 0.5) -> list[np.ndarray]:
    """Partition a train set over ``k`` devices with the README's fixed seeds: ``"iid"`` is
    :func:`partition_iid` with seed 1, ``"dirichlet"`` is :func:`partition_dirichlet` with
    seed 2 and concentration ``alpha``.

    Returns:
        ``k`` int64 arrays of positions into the train set.

    Raises:
        ConfigError: unknown scheme, ``k < 1`` or ``alpha <= 0``.
    """
    labels = np.asarray(labels)
    if scheme == "iid":
        return partition_iid(len(labels), k, IID_SEED)
    if scheme == "dirichlet":
        return partition_dirichlet(labels, k, alpha, DIRICHLET_SEED)
    raise ConfigError(f"unknown partition scheme {scheme!r}; expected one of {list(SCHEMES)}")


def mnist10k_partitions(k: int, scheme: str = "iid", alpha: float = 0.5, *,
                        y_train: np.ndarray | None = None,
                        data_dir: str | os.PathLike[str] | None = None) -> list[np.ndarray]:
    """Partition of the MNIST-10k train set (positions 0..7999 of ``mnist10k_split``'s train
    arrays) over ``k`` devices exactly as ../shared/data/README.md defines it (see
    :func:`partition`).

    Args:
        y_train: the split's train labels, if already loaded (else they are loaded from
            ``data_dir``); only the Dirichlet scheme reads them.

    Raises:
        ConfigError: bad scheme, k or alpha. DataError: the data set is missing or corrupt.
    """
    if scheme == "iid":
        return partition_iid(MNIST10K_TRAIN, k, IID_SEED)
    if y_train is None:
        y_train = mnist10k_split(data_dir)[1]
    if len(y_train) != MNIST10K_TRAIN:
        raise DataError(f"mnist10k_partitions: y_train has {len(y_train)} labels, expected {MNIST10K_TRAIN}")
    return partition(y_train, k, scheme, alpha)
