"""The common support of a secure round: the k coordinates every device sends values on.

Masks only cancel where every device sends a value, and Top-K lets each device choose its
own coordinates; so a secure round fixes one support for all, derived from state every party
already holds, and sends values without indices. Rule (in the spirit of the field notes'
suggestion; measured against client Top-K in benchmarks): the ``k - e`` coordinates of
largest |ranking signal| (ties to the lower index), plus ``e = ceil(explore * k)``
coordinates drawn from the rest with the generator ``default_rng([seed, round, 0x5EC])``, so
that coordinates the signal leaves alone get their turn. Without a signal all k are drawn.
Error feedback keeps everything off the support in the device's residual.

The signal matters: the last global model step lies only on the last support (the sum is all
the coordinator sees), so ranked by it the support stays near the first round's random draw
(issue #26: 1-4% of the MNIST CNN input's energy). With ``[secure_aggregation] ranking =
"gradient"`` the coordinator adds the loss gradient of the global model on its held-out gate
samples (``coordinator.evaluation.gate_gradient``); by default it passes the last step.
"""

from __future__ import annotations

import math

import numpy as np

from fedmq.errors import FedmqError
from fedmq.secagg.ring import RingSpec


class SupportError(FedmqError):
    """Invalid support parameters (k outside 1..size, explore outside [0, 1], wrong shape)."""


def common_support(size: int, k: int, *, last_change: np.ndarray | None, seed: int, round_: int,
                   explore: float = 0.1) -> np.ndarray:
    """The support of round ``round_``: sorted, distinct int64 indices ``(k,)`` into ``(size,)``.

    Args:
        size: the flat model's length (ParamSpec.size).
        k: coordinates sent (density * size).
        last_change: float32 ``(size,)``, the ranking signal: only its magnitude counts (the
            coordinator's gate-sample loss gradient, or the last global model step, version V
            minus V-1), or None (all k drawn).
        seed, round_: the federation's seed and the round (the exploration draw).
        explore: share of k drawn at random (0..1).

    Raises:
        SupportError: k outside 1..size, explore outside [0, 1], a last change of another shape.
    """
    if not 1 <= k <= size or not 0.0 <= explore <= 1.0:
        raise SupportError(f"k in 1..{size} and explore in [0, 1] expected, got k={k}, explore={explore}")
    chosen = np.zeros(0, dtype=np.int64)
    drawn = k
    if last_change is not None:
        if last_change.shape != (size,):
            raise SupportError(f"last change of shape {last_change.shape}, expected ({size},)")
        drawn = math.ceil(explore * k)
        chosen = np.argsort(-np.abs(last_change.astype(np.float64)), kind="stable")[:k - drawn].astype(np.int64)
    rest = np.setdiff1d(np.arange(size, dtype=np.int64), chosen, assume_unique=True)
    picked = np.random.default_rng([int(seed), int(round_), 0x5EC]).choice(rest, size=drawn, replace=False)
    return np.sort(np.concatenate([chosen, picked.astype(np.int64)]))


def values_on_support(vector: np.ndarray, support: np.ndarray, ring: RingSpec, *,
                      l2_clip: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A device's input for a secure round, with what it sends for its error feedback.

    Args:
        vector: float32 ``(size,)``, the residual plus this round's update.
        support: the round's :func:`common_support`, int64 ``(k,)``.
        ring: the round's ring.
        l2_clip: under differential privacy, the clip norm C: the values on the support are
            scaled to L2 norm at most C, then truncated towards zero to integers, so the
            integers have L2 norm at most ``ring.scale * C``
            (:mod:`fedmq.privacy.discrete`). None: each value clipped to ``ring.clip`` and
            rounded to the nearest integer.

    Returns:
        ``(q, sent)``: the ring integers on the support, int64 ``(k,)``, and float32
        ``(size,)`` holding what they stand for on the support and zero elsewhere. The new
        residual is ``vector - sent``: everything off the support, and the clipping and
        rounding error on it, stays on the device.
    """
    values = vector[support]
    if l2_clip is None:
        q = ring.quantize(values)
    else:
        v = values.astype(np.float64)
        norm = math.sqrt(float(np.square(v).sum()))
        if norm > l2_clip:
            v *= l2_clip / norm * (1.0 - 1e-12)  # float64 rounding must not carry the norm past C
        q = np.trunc(v * ring.scale).astype(np.int64)
    sent = np.zeros(vector.shape, dtype=np.float32)
    sent[support] = ring.dequantize(q)
    return q, sent
