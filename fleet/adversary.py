"""Byzantine devices in the fleet simulator: ``[adversary]`` in the fleet file.

A seeded ``fraction`` of the virtual devices is Byzantine (:func:`byzantine_indices`,
a pure function of the fleet's seed). A Byzantine device is the real edge agent with its
own MQTT connection and its own broker account (``credentials_dir``), like every other
device; what differs is its data or what it does to its client update before the agent
packages it (Top-K, int8, error feedback and the envelope are the agent's own). Honest
devices are untouched.

Attacks (``attack``):

* ``sign-flip``: the update is negated (the device pushes the global model back);
* ``scale``: the update is multiplied by ``scale`` (a model-replacement style boost);
* ``label-flip``: the device trains honestly on its data with every label ``y`` replaced
  by ``classes - 1 - y`` (data poisoning; written into its data file by
  :func:`poison_data`);
* ``little-is-enough`` (Baruch et al. 2019, "A Little Is Enough: Circumventing Defenses
  For Distributed Learning"): the Byzantine devices of a worker process collude; each
  trains honestly, adds its honest update to a board shared by the process's Byzantine
  devices (the last :data:`BOARD` updates), and sends ``mean - z * std`` per coordinate of
  the board: close enough to the honest updates to pass distance and coordinate-wise
  filters, consistently biased. With one update on the board it sends it unchanged;
* ``backdoor``: a ``poison_fraction`` of the device's samples gets a trigger (a bright
  square in the image's bottom-right corner, :func:`add_trigger`) and the ``target``
  label; the attack success rate is the share of triggered test images whose true label
  is not ``target`` that the global model classifies as ``target``
  (:func:`attack_success_rate`).
"""

from __future__ import annotations

import math
import threading
from collections import deque
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

ATTACKS = ("none", "sign-flip", "scale", "label-flip", "little-is-enough", "backdoor")
#: Honest updates the colluding ``little-is-enough`` devices of one process remember.
BOARD = 8


class Adversary(BaseModel):
    """``[adversary]`` of a fleet file; defaults: no Byzantine device.

    Attributes:
        attack: one of :data:`ATTACKS`.
        fraction: share of the devices that are Byzantine, in [0, 1); ``round(fraction *
            devices)`` of them, drawn with the fleet's seed.
        scale: multiplier of the ``scale`` attack (negative: flipped and scaled).
        z: ``little-is-enough``: standard deviations subtracted from the mean.
        target: ``backdoor``: the label the trigger maps to.
        poison_fraction: ``backdoor``: share of a Byzantine device's samples given the trigger.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    attack: Literal["none", "sign-flip", "scale", "label-flip", "little-is-enough", "backdoor"] = "none"
    fraction: float = Field(0.0, ge=0, lt=1)
    scale: float = 10.0
    z: float = Field(1.0, ge=0)
    target: int = Field(0, ge=0)
    poison_fraction: float = Field(0.5, gt=0, le=1)


def byzantine_indices(adversary: Adversary, devices: int, seed: int) -> frozenset[int]:
    """Indices of the Byzantine devices: ``round(fraction * devices)`` drawn without
    replacement with ``default_rng([seed, 5])`` (empty when the attack is ``none``)."""
    if adversary.attack == "none" or adversary.fraction == 0:
        return frozenset()
    k = int(round(adversary.fraction * devices))
    return frozenset(int(i) for i in np.random.default_rng([int(seed), 5]).choice(devices, k, replace=False))


def add_trigger(x: np.ndarray) -> np.ndarray:
    """A copy of ``x`` (float32 ``(n, ...)``, each sample a square image, flat or not) with
    the trigger: the bottom-right ``max(2, side // 8)`` square set to 1.0 (the data's
    maximum intensity: digits and MNIST are scaled to [0, 1])."""
    n = x.shape[0]
    flat = x.reshape(n, -1).copy()
    side = math.isqrt(flat.shape[1])
    patch = max(2, side // 8)
    img = flat.reshape(n, -1, side, side)
    img[:, :, side - patch:, side - patch:] = 1.0
    return img.reshape(x.shape)


def poison_data(adversary: Adversary, x: np.ndarray, y: np.ndarray, classes: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A Byzantine device's training data: labels flipped (``label-flip``) or a share of
    the samples triggered and relabelled ``target`` (``backdoor``); unchanged otherwise.

    Args:
        x: float32 ``(n, ...)``; y: int64 ``(n,)``; classes: number of labels.
    """
    if adversary.attack == "label-flip":
        return x, (classes - 1 - y).astype(y.dtype)
    if adversary.attack == "backdoor":
        k = max(1, int(round(adversary.poison_fraction * len(y))))
        pick = rng.choice(len(y), k, replace=False)
        x, y = x.copy(), y.copy()
        x[pick] = add_trigger(x[pick])
        y[pick] = adversary.target
        return x, y
    return x, y


class Colluders:
    """The honest updates the ``little-is-enough`` devices of one process share (the last
    :data:`BOARD`); devices train on their own threads, hence the lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.updates: deque[np.ndarray] = deque(maxlen=BOARD)


#: The colluders of this worker process.
COLLUDERS = Colluders()


def poison_update(adversary: Adversary, update: np.ndarray, colluders: Colluders = COLLUDERS) -> None:
    """Rewrite a Byzantine device's client update in place (float32 ``(d,)``) for the
    update attacks (``sign-flip``, ``scale``, ``little-is-enough`` with ``colluders``);
    the data attacks leave it as trained."""
    if adversary.attack == "sign-flip":
        update *= -1.0
    elif adversary.attack == "scale":
        update *= adversary.scale
    elif adversary.attack == "little-is-enough":
        with colluders.lock:
            colluders.updates.append(update.copy())
            board = np.stack(colluders.updates) if len(colluders.updates) > 1 else None
        if board is not None:
            update[:] = board.mean(axis=0) - adversary.z * board.std(axis=0)


def attack_success_rate(predict: Any, x_test: np.ndarray, y_test: np.ndarray, target: int) -> float:
    """Share of the triggered test images whose true label is not ``target`` that
    ``predict(x) -> labels`` classifies as ``target``."""
    keep = y_test != target
    return float(np.mean(predict(add_trigger(x_test[keep])) == target))
