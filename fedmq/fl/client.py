"""The client-update pipeline, written once: train, compress with error feedback, envelope.

Every producer of client updates goes through these functions: the edge agent
(``edge_client/agent.py``), the simulator (which runs the real agent), the device and ingest
benchmarks and the test devices. Two steps, because the edge agent checks the round's
deadline between them (an update trained too late is kept in the residual instead of sent):

1. :func:`train_for_task` runs local training (:func:`fedmq.fl.training.train_local`) for
   a :class:`fedmq.wire.messages.RoundTask`, with the local-training generator of
   :func:`training_rng` (a pure function of the device's seed, the plan's seed and the
   round, so a rerun of a round trains the same update);
2. :func:`package_update` adds the update into the residual, encodes it with the plan's
   codec (:func:`fedmq.codecs.encode`), takes what was sent out of the residual
   (:class:`fedmq.fl.feedback.ErrorFeedback`; plain compression when the plan turns error
   feedback off) and builds the :class:`fedmq.wire.envelope.ClientUpdate` envelope. Under
   differential privacy (``plan.clip_norm`` > 0) what is sent is clipped to the clip norm as
   the coordinator decodes it, and under distributed noise (``plan.noise_std`` > 0) the
   device's Gaussian noise share is added to it (:mod:`fedmq.privacy.clipping`).

:func:`client_update` chains both.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from fedmq.codecs import encode
from fedmq.wire.envelope import ClientUpdate, encode_update
from fedmq.fl.feedback import ErrorFeedback
from fedmq.fl.training import LocalResult, train_local
from fedmq.wire.messages import RoundTask
from fedmq.model.params import ParamSpec
from fedmq.privacy.clipping import l2_norm, noise_share

if TYPE_CHECKING:
    from fedmq.tasks import Task


def training_rng(seed: int, plan_seed: int, round_: int) -> np.random.Generator:
    """The generator of local training (minibatch order) for one round on one device."""
    return np.random.default_rng([int(seed), int(plan_seed), int(round_)])


def rounding_rng(seed: int, plan_seed: int, round_: int) -> np.random.Generator:
    """The generator of stochastic rounding in the codec for one round on one device."""
    return np.random.default_rng([int(seed), int(plan_seed), int(round_), 1])


@dataclass(frozen=True)
class PackagedUpdate:
    """A client update ready to publish.

    Attributes:
        data: the envelope bytes (docs/wire-format.md, "Client update envelope").
        sent: float32 ``(d,)``: exactly what the coordinator will decode (less the noise share
            under distributed noise); put it back into the residual
            (:meth:`ErrorFeedback.rollback`) if the update is never aggregated.
        codec: the codec's name.
    """

    data: bytes
    sent: np.ndarray
    codec: str


def train_for_task(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, task: RoundTask, *, seed: int,
                   max_seconds: float | None = None, x_val: np.ndarray | None = None,
                   y_val: np.ndarray | None = None, task_def: Task | None = None,
                   correction: np.ndarray | None = None) -> LocalResult:
    """Local training for ``task`` from the global model already loaded into ``model``.

    Args:
        model: the task's module holding global model ``task.model_version``.
        x, y: local training samples (float32 ``(N, *input_shape)``, int64 ``(N,)``).
        task: the round's task (its plan sets epochs or steps, batch size, lr, FedProx).
        seed: the device's seed.
        max_seconds: cap on training time, seconds (None: the plan's own cap).
        x_val, y_val: local held-out samples for ``val_*`` metrics, or None.
        task_def: the learning task (its loss and metrics; :mod:`fedmq.tasks`), None for
            cross-entropy classification.
        correction: Scaffold's ``c - c_i``, float32 ``(d,)`` (:mod:`fedmq.fl.scaffold`), or None.

    Returns:
        :class:`fedmq.fl.training.LocalResult` (the update is float32 ``(d,)``).
    """
    plan = task.plan
    cap = plan.max_seconds if max_seconds is None else max_seconds
    return train_local(model, x, y, plan, rng=training_rng(seed, plan.seed, task.round), max_seconds=cap,
                       x_val=x_val, y_val=y_val, task=task_def, correction=correction)


def package_update(result: LocalResult, task: RoundTask, *, federation: str, device: str, spec: ParamSpec,
                   feedback: ErrorFeedback, seed: int, control: bytes = b"") -> PackagedUpdate:
    """Compress ``result.update`` with error feedback and wrap it in its envelope.

    With ``task.plan.error_feedback`` the residual takes ``update - sent`` (the whole
    compression error, quantization included); without it the residual is left as it is.
    Non-finite metrics are left out of the envelope (the decoder would refuse them).

    With ``task.plan.clip_norm`` > 0 the decoded payload has L2 norm at most the clip norm
    and the metric ``dp_unclipped`` says (1.0 / 0.0) whether the vector the device meant to
    send already was within it (the bit adaptive clipping counts; Andrew et al. 2021). With
    ``task.plan.noise_std`` > 0 (codec ``none``) a fresh Gaussian noise share from the
    operating system's entropy is added after clipping; ``sent`` stays the clipped vector
    without noise (what a rollback puts back into the residual).

    ``control``: Scaffold's compressed control-variate change (:func:`fedmq.fl.scaffold.package_control`,
    same codec), carried in the envelope's ``control`` key; ``b""``: none.

    Raises:
        NonFiniteError: NaN or Inf in the update (the residual is unchanged).
        CodecError: the codec cannot encode for ``spec``.
    """
    plan = task.plan
    codec = plan.codec
    rng = rounding_rng(seed, plan.seed, task.round)
    metrics = dict(result.metrics, steps=float(result.steps), train_seconds=result.seconds)
    if plan.clip_norm > 0:
        wanted = feedback.residual + result.update if plan.error_feedback else result.update
        metrics["dp_unclipped"] = float(l2_norm(wanted) <= plan.clip_norm)
    payload, sent = feedback.compress(result.update, codec, enabled=plan.error_feedback, rng=rng,
                                      clip_norm=plan.clip_norm)
    if plan.noise_std > 0:
        noisy = sent + noise_share(spec.size, plan.noise_std, np.random.default_rng(secrets.randbits(128)))
        payload = encode(noisy, spec, codec)
    data = encode_update(ClientUpdate(
        federation=federation, device=device, round=task.round, base_version=task.model_version,
        samples=result.samples, kind=result.kind, spec_hash=spec.hash, codec=codec.name, payload=payload,
        metrics={k: float(v) for k, v in metrics.items() if math.isfinite(v)}, control=control))
    return PackagedUpdate(data, sent, codec.name)


def client_update(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, task: RoundTask, *, federation: str,
                  device: str, spec: ParamSpec, feedback: ErrorFeedback, seed: int,
                  max_seconds: float | None = None) -> tuple[LocalResult, PackagedUpdate]:
    """:func:`train_for_task` then :func:`package_update` (no deadline between them)."""
    result = train_for_task(model, x, y, task, seed=seed, max_seconds=max_seconds)
    return result, package_update(result, task, federation=federation, device=device, spec=spec,
                                  feedback=feedback, seed=seed)
