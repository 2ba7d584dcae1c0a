"""Two user tasks on synthetic sensor data, and tasks the checks must refuse.

* ``classify``: 3 kinds of vibration from 8 accelerometer features, default ``.npz`` data.
* ``regress``: a linear sensor calibration (4 raw readings -> 1 value), its own CSV format.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import nn

from fedmq.tasks import Task


def _blobs() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    centers = rng.normal(0.0, 2.0, size=(3, 8))
    y = rng.integers(0, 3, size=600)
    x = (centers[y] + rng.normal(0.0, 1.0, size=(600, 8))).astype(np.float32)
    return x[:450], y[:450], x[450:], y[450:]


def _linear() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(4)
    x = rng.uniform(-1.0, 1.0, size=(500, 4)).astype(np.float32)
    y = (x @ np.array([1.5, -2.0, 0.5, 3.0]) + 0.7 + rng.normal(0, 0.05, 500)).astype(np.float32)
    return x[:400], y[:400], x[400:], y[400:]


def load_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    rows = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
    return rows[:, :-1], rows[:, -1]


def save_csv(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    np.savetxt(path, np.column_stack([x, y]), delimiter=",", header="a,b,c,d,value", comments="")


classify = Task(name="user-classify", build=lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)),
                input_shape=(8,), num_classes=3, reference_data=_blobs,
                demo_plan={"local_epochs": 2, "batch_size": 16, "lr": 0.1})

regress = Task(name="user-regress", build=lambda: nn.Linear(4, 1), input_shape=(4,), kind="regression",
               load_data=load_csv, save_data=save_csv, data_file="data.csv", input_range=(-1.0, 1.0),
               reference_data=_linear, demo_plan={"local_epochs": 3, "batch_size": 16, "lr": 0.05})

with_batchnorm = Task(name="user-bn", build=lambda: nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)),
                      input_shape=(8,), num_classes=3)

not_a_task = "a string"
