"""The device's local training data: read with the task's loader, checked against the task,
and read again when it grows.

A sensor may append to the device's data between rounds (a CSV, an SQLite log, a folder of
new files). :class:`LocalData` remembers a cheap fingerprint of the data path (size and
modification time in nanoseconds of the file, of an SQLite ``-wal`` / ``-journal``
beside it, or of every file under a folder) and calls the task's loader again only when the
fingerprint changed (:meth:`LocalData.refresh`, called at the start of each round).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from fedmq.errors import DataError
from fedmq.fl.training import split_holdout
from fedmq.tasks import Task

log = logging.getLogger(__name__)

#: Files looked at under a data folder for the fingerprint (bounds the cost of a refresh).
MAX_FINGERPRINT_FILES = 10_000


def load_local_data(path: str | os.PathLike[str], task: Task, where: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Local samples for ``task``: :meth:`fedmq.tasks.Task.load_local` (the task's loader,
    by default an ``.npz`` with arrays ``x``, ``y`` or a folder of MNIST IDX files, then the
    shape, dtype, label and value-range checks of docs/tasks.md).

    Returns:
        ``(x, y)``: x float32 ``(N, *task.input_shape)``; y int64 ``(N,)`` in
        ``[0, task.num_classes)`` or float32 ``(N, *task.target_shape)``; N >= 1.

    Raises:
        DataError: missing or corrupt data, or data that does not fit the task (the message
            names ``where``, the path and what was expected).
    """
    return task.load_local(path, where)


def fingerprint(path: Path) -> tuple[tuple[str, int, int], ...]:
    """``(name, size, mtime_ns)`` of the data file and its SQLite companions, or of the files
    under a data folder (at most :data:`MAX_FINGERPRINT_FILES`); empty when nothing exists."""
    entries: list[Path] = []
    if path.is_dir():
        for i, p in enumerate(sorted(path.rglob("*"))):
            if i >= MAX_FINGERPRINT_FILES:
                break
            entries.append(p)
    else:
        entries = [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-journal")]
    out = []
    for p in entries:
        try:
            st = p.stat()
        except OSError:
            continue
        if not p.is_dir():
            out.append((str(p), st.st_size, st.st_mtime_ns))
    return tuple(out)


class LocalData:
    """A device's data, split into local training and held-out parts, kept up to date.

    Args:
        path: the configured data path. task: the device's task.
        where: what errors name (configuration file and option).
        holdout_fraction, seed: as :func:`fedmq.fl.training.split_holdout`.

    Attributes:
        x, y: local training samples; x_val, y_val: the held-out part (see load_local_data
            for shapes and dtypes). samples: ``len(y) + len(y_val)``. loads: loader calls.

    Raises (construction):
        DataError: as :func:`load_local_data`.
    """

    def __init__(self, path: str | os.PathLike[str], task: Task, *, where: str, holdout_fraction: float,
                 seed: int) -> None:
        self.path = Path(path)
        self.task = task
        self.where = where
        self.holdout_fraction = holdout_fraction
        self.seed = seed
        self.loads = 0
        self._fingerprint = fingerprint(self.path)
        self.x, self.y, self.x_val, self.y_val, self.samples = self._read()

    def _read(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
        """The data as split for training and hold-out, and its number of samples."""
        x, y = load_local_data(self.path, self.task, self.where)
        x_train, y_train, x_val, y_val = split_holdout(x, y, self.holdout_fraction, self.seed)
        self.loads += 1
        return x_train, y_train, x_val, y_val, len(y)

    def refresh(self) -> bool:
        """Read the data again if its fingerprint changed. True when new data was loaded.

        A failed read (a file caught half-written, a sample that does not fit) keeps the
        data loaded before and is logged: the device goes on training on what it had.
        """
        fp = fingerprint(self.path)
        if fp == self._fingerprint:
            return False
        before = self.samples
        self._fingerprint = fp
        try:
            self.x, self.y, self.x_val, self.y_val, self.samples = self._read()
        except DataError as exc:
            log.warning("local data changed but cannot be read again (%s); training on the %d samples read before",
                        exc, before)
            return False
        log.info("local data reloaded: %d samples (was %d)", self.samples, before)
        return True
