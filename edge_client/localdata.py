"""The device's local training data, read with fedmq's own loaders and checked against the task."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from fedmq.data import load_mnist_dir, load_npz
from fedmq.errors import DataError
from fedmq.tasks import TaskDef


def load_local_data(path: str | os.PathLike[str], task: TaskDef) -> tuple[np.ndarray, np.ndarray]:
    """Local samples for ``task`` from an ``.npz`` file (arrays ``x``, ``y``) or a folder of
    MNIST IDX files (``t10k-*`` or ``train-*``, optionally gzipped).

    Samples stored flat (e.g. 784 values for a ``(1, 28, 28)`` task) are reshaped to the
    task's input shape when the element count matches.

    Returns:
        ``(x, y)``: x float32 ``(N, *task.input_shape)``, y int64 ``(N,)`` in
        ``[0, task.num_classes)``, N >= 1.

    Raises:
        DataError: the path does not exist, a file is corrupt, the samples do not fit the
            task's input shape or a label is out of range (the message names the path).
    """
    path = Path(path)
    if path.is_dir():
        prefix = "train" if any(path.glob("train-images-idx3-ubyte*")) else "t10k"
        x, y = load_mnist_dir(path, prefix)
    elif path.is_file():
        x, y = load_npz(path)
    else:
        raise DataError(f"{path}: data file not found (expected an .npz file with arrays x and y, "
                        "or a folder of MNIST IDX files)")
    if len(y) == 0:
        raise DataError(f"{path}: no samples")
    if tuple(x.shape[1:]) != task.input_shape:
        if int(np.prod(x.shape[1:])) != int(np.prod(task.input_shape)):
            raise DataError(f"{path}: samples of shape {tuple(x.shape[1:])}, task {task.name!r} expects "
                            f"{task.input_shape}")
        x = x.reshape((len(x), *task.input_shape))
    if int(y.max()) >= task.num_classes:
        raise DataError(f"{path}: label {int(y.max())} out of range for task {task.name!r} "
                        f"({task.num_classes} classes)")
    return x, y
