"""``acsf1-cnn``: appliance recognition from smart-plug power readings (a real IoT data set).

Data: ACS-F1, the Appliance Consumption Signature database (Gisler, Ridi, Zufferey, Khaled,
Hennebert 2013, "Appliance consumption signature database and recognition test
protocols", WoSSPA), in the UCR archive release ``ACSF1`` that sktime ships inside its
wheel (sktime/datasets/data/ACSF1, 3.3 MB; no download). 100 appliances of 10 kinds
(coffee machines, computer stations, fridges and freezers, Hi-Fi systems, lamps, laptops,
microwave ovens, printers, televisions, ...), each plugged into a smart plug for two one-hour
sessions; one series per session, 1,460 power readings, z-normalised per series by the
archive. Train = 100 series, test = 100 series, 10 per class in each.

The UCR release carries no household or plug id, so the demo cuts the train set over
devices with fedmq's partitions (IID or Dirichlet label skew: homes own different mixes of
appliances); each device holds its partition as an ``.npz`` (the default loader), so the
device install needs no sktime. Only :func:`load_acsf1` (the demo, the coordinator's
``evaluation.data = "task"``, benchmarks/iot.py) needs the ``fedmq[iot]`` extra.

Model: a 1-D CNN, conv9(16, stride 2)-ReLU-maxpool4-conv9(32)-ReLU-maxpool4-conv9(32)-ReLU-
global max pool-fc10, 14,378 parameters, no buffers. Input float32 ``(N, 1, 1460)``.
"""

from __future__ import annotations

import numpy as np
from torch import nn

from fedmq.errors import ConfigError, DataError
from fedmq.tasks.api import Task

#: Readings per series, and classes.
LENGTH, CLASSES = 1460, 10


def load_acsf1() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The archive's own train/test split of ACSF1, from sktime's bundled files.

    Returns:
        ``(x_train, y_train, x_test, y_test)``: x float32 ``(100, 1, 1460)`` (z-normalised
        power readings), y int64 ``(100,)`` in 0..9.

    Raises:
        ConfigError: sktime is not installed (``pip install 'fedmq[iot]'``).
        DataError: the bundled files are missing or not of the expected shape.
    """
    try:
        from sktime.datasets import load_UCR_UEA_dataset
    except ImportError as exc:
        raise ConfigError(f"task 'acsf1-cnn': its data set ships with sktime, which is not installed ({exc}); "
                          "install the extra: pip install 'fedmq[iot]'") from None
    out = []
    for split in ("train", "test"):
        try:
            x, y = load_UCR_UEA_dataset("ACSF1", split=split, return_type="numpy3D")
        except Exception as exc:  # sktime raises assorted errors for a broken install
            raise DataError(f"sktime's bundled ACSF1 {split} set cannot be read ({type(exc).__name__}: {exc})") from None
        if x.shape[1:] != (1, LENGTH):
            raise DataError(f"sktime's ACSF1 {split} set has series of shape {x.shape[1:]}, expected (1, {LENGTH})")
        out += [np.ascontiguousarray(x, dtype=np.float32), np.asarray(y).astype(np.int64)]
    return out[0], out[1], out[2], out[3]


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(1, 16, 9, stride=2, padding=4), nn.ReLU(), nn.MaxPool1d(4),
        nn.Conv1d(16, 32, 9, padding=4), nn.ReLU(), nn.MaxPool1d(4),
        nn.Conv1d(32, 32, 9, padding=4), nn.ReLU(), nn.AdaptiveMaxPool1d(1),
        nn.Flatten(), nn.Linear(32, CLASSES),
    )


task = Task(
    name="acsf1-cnn", build=_cnn, input_shape=(1, LENGTH), num_classes=CLASSES, reference_data=load_acsf1,
    demo_plan={"local_epochs": 5, "batch_size": 8, "lr": 0.05},
    description="ACS-F1 smart-plug appliance recognition (10 kinds), 1-D CNN, 14,378 parameters")
