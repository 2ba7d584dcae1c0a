"""Scaffold: control variates against client drift, on compressed links both ways.

Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning" (ICML 2020, arXiv 1910.06378), Algorithm 1 with option II for the device's
control variate. With the global model ``x``, the server control variate ``c`` and device
``i``'s control variate ``c_i`` (all float32 ``(d,)``):

* local step (``K`` minibatch steps of learning rate ``lr`` from ``y = x``)::

      y <- y - lr * (g(y) - c_i + c)

  :func:`fedmq.fl.training.train_local` adds ``correction = c - c_i`` to every gradient;
* after training (option II)::

      c_i+ = c_i - c + (x - y) / (K * lr)

  :func:`control_update`; the device sends ``delta y = y - x`` (the client update, as
  FedAvg) and ``delta c_i = c_i+ - c_i``, each compressed with its own error-feedback
  residual (:func:`package_control`); the envelope's ``control`` key carries the second;
* the server steps the global model with the server optimizer as for FedAvg and its
  control variate with ``c <- c + (|S| / N) * mean_{i in S}(delta c_i) = c + sum(delta c_i) / N``
  (:func:`server_control_step`), ``N`` the fleet size (the coordinator counts the devices it
  knows for the task, at least ``|S|``: under partial participation each device that did not
  take part counts with ``delta c_j = 0``, as in the paper).

The mean over ``delta c_i`` is uniform (the paper's), unlike the sample-weighted mean of the
client updates. Everything here is pure (no I/O): the device's durable state is
``edge_client/scaffold.py``, the coordinator's ``coordinator/scaffold.py``, the control
variate's downlink :mod:`fedmq.fl.control_chain`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedmq.codecs import CodecSpec, SparseUpdate
from fedmq.errors import NonFiniteError, SpecMismatchError
from fedmq.fl.feedback import ErrorFeedback
from fedmq.model.params import ParamSpec


def _vector(x: np.ndarray, size: int, what: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.shape != (size,):
        raise SpecMismatchError(f"{what} has shape {arr.shape}, expected ({size},)")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise NonFiniteError(f"{what} contains NaN or Inf")
    return arr


def control_update(c_i: np.ndarray, c: np.ndarray, update: np.ndarray, steps: int, lr: float) -> np.ndarray:
    """Option II of Scaffold: ``c_i+ = c_i - c + (x - y) / (K lr)``.

    Args:
        c_i: float32 ``(d,)``, the device's control variate before the round.
        c: float32 ``(d,)``, the server control variate the device trained with.
        update: float32 ``(d,)``, the client update ``y - x`` (model after local training
            minus the global model), so ``x - y = -update``.
        steps: ``K``, minibatch steps actually done (>= 1).
        lr: local learning rate (> 0).

    Returns:
        float32 ``(d,)``, ``c_i+``.

    Raises:
        SpecMismatchError: shapes differ. NonFiniteError: NaN/Inf in an input or the result.
        ValueError: ``steps < 1`` or ``lr <= 0``.
    """
    if steps < 1 or not lr > 0:
        raise ValueError(f"control_update needs steps >= 1 and lr > 0, got {steps}, {lr}")
    size = np.shape(update)[0] if np.ndim(update) == 1 else -1
    ci, cs, upd = (_vector(v, size, w) for v, w in ((c_i, "c_i"), (c, "c"), (update, "update")))
    out = (ci - cs - upd / np.float32(steps * lr)).astype(np.float32)
    if not np.isfinite(out).all():
        raise NonFiniteError("the new control variate overflowed float32")
    return out


def server_control_step(c: np.ndarray, delta_sum: np.ndarray, fleet_size: int) -> np.ndarray:
    """``c + sum_{i in S}(delta c_i) / N`` (= ``c + (|S|/N) mean(delta c_i)``), float32 ``(d,)``.

    Raises:
        ValueError: ``fleet_size < 1``. SpecMismatchError: shapes differ.
    """
    if fleet_size < 1:
        raise ValueError(f"fleet size must be >= 1, got {fleet_size}")
    if np.shape(c) != np.shape(delta_sum):
        raise SpecMismatchError(f"control variate {np.shape(c)} and sum of changes {np.shape(delta_sum)} differ")
    return (np.asarray(c, dtype=np.float64) + np.asarray(delta_sum, dtype=np.float64) / fleet_size
            ).astype(np.float32)


class ControlSum:
    """The round's sum of accepted ``delta c_i`` (float64 ``(d,)``, one accumulator) and
    how many were added. Sparse changes add only their kept entries."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.total = np.zeros(size, dtype=np.float64)
        self.count = 0

    def add(self, change: SparseUpdate) -> None:
        """Add one decoded ``delta c_i`` (``indices`` None: dense; else strictly increasing,
        so a fancy-indexed add touches each entry once)."""
        if change.indices is None:
            self.total += change.values
        else:
            self.total[change.indices] += change.values
        self.count += 1


@dataclass(frozen=True)
class ControlPackage:
    """What a device sends and keeps for one round's control variate.

    Attributes:
        payload: codec bytes of ``delta c_i`` (after error feedback), for the envelope's ``control``.
        control: float32 ``(d,)``, ``c_i+`` (the device's control variate once the update is accepted).
        residual: float32 ``(d,)``, the control residual after compression (kept with ``control``).
        sent: float32 ``(d,)``, what the coordinator will decode from ``payload``.
    """

    payload: bytes
    control: np.ndarray
    residual: np.ndarray
    sent: np.ndarray


def package_control(c_i: np.ndarray, residual: np.ndarray, c: np.ndarray, update: np.ndarray, *, steps: int,
                    lr: float, spec: ParamSpec, codec: CodecSpec, error_feedback: bool = True,
                    rng: np.random.Generator | None = None) -> ControlPackage:
    """``c_i+`` (:func:`control_update`) and ``delta c_i = c_i+ - c_i`` compressed with its own
    error-feedback residual (:class:`fedmq.fl.feedback.ErrorFeedback`: the residual takes what the
    codec dropped, quantization included), with the update's codec settings.

    Args:
        c_i, residual, c, update: float32 ``(spec.size,)`` (see :func:`control_update`);
            ``residual`` is the control residual before this round (not changed in place).
        steps, lr: ``K`` and the local learning rate.
        error_feedback: False: ``delta c_i`` is compressed alone and the residual stays (the
            plan's ablation switch, as for the update).

    Raises:
        SpecMismatchError, NonFiniteError, ValueError: as :func:`control_update`.
        CodecError: invalid codec settings.
    """
    new = control_update(c_i, c, update, steps, lr)
    memory = ErrorFeedback(spec, residual)
    payload, sent = memory.compress(new - _vector(c_i, spec.size, "c_i"), codec, enabled=error_feedback, rng=rng)
    return ControlPackage(payload, new, memory.residual, sent)


def check_plan(algorithm: str, *, mode: str, secure: bool, privacy: bool) -> None:
    """Scaffold runs in synchronous plain rounds only.

    Raises:
        ValueError: with asynchronous rounds (no round to step ``c`` with), secure rounds (the
            masked sum carries no ``delta c_i``) or differential privacy (``delta c_i`` is
            neither clipped nor noised, so no epsilon would cover it).
    """
    if algorithm != "scaffold":
        return
    if mode != "sync" or secure or privacy:
        raise ValueError("plan.algorithm 'scaffold' needs round.mode 'sync' without secure_aggregation or privacy "
                         f"(got mode {mode!r}, secure_aggregation {secure}, privacy {privacy}): the control variate "
                         "change travels beside each update, which those modes never show or account")

