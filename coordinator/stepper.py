"""The server step: the server optimizer on the aggregate, the gate, the compressed downlink.

:class:`Stepper` turns one aggregated model change into the next global model: the server
optimizer steps (:mod:`fedmq.fl.server_opt`), the candidate must be finite and evaluate to a
finite loss on the gate samples (:func:`coordinator.evaluation.gate_loss`) or nothing moves,
and with a compressed downlink (:mod:`fedmq.fl.downlink`) the step is taken on the server
model ``published + residual`` and only its compressed distance to the published model is
published, the rest kept in the server residual (server-side error feedback).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from coordinator.config import CoordinatorConfig
from coordinator.evaluation import gate_loss
from coordinator.publisher import delta_path
from fedmq.storage.atomic import atomic_write_bytes
from fedmq.fl.chain import DeltaBlob
from fedmq.fl import downlink
from fedmq.fl.downlink import params_sha256
from fedmq.fl.server_opt import ServerOptimizer
from fedmq.model.params import ParamSpec, load_params
from fedmq.tasks import Task

log = logging.getLogger("fedmq.coordinator")


class Stepper:
    """How the global model steps.

    Args:
        config: the configuration (``[server_optimizer]`` built into ``optimizer``, ``[downlink]``,
            ``[warmup]``, ``[evaluation] gate_samples``, ``state_dir``).
        task, spec, model: the learning task, its ParamSpec, a module for the gate.
        optimizer: the server optimizer (its state is checkpointed by the driver).
        eval_data: held-out ``(x, y)`` for the gate, or None (no gate).

    Attributes:
        residual: float32 ``(spec.size,)`` server residual of a compressed downlink (what the
            downlink codec has not sent yet), or None with a dense downlink. Restored from the
            checkpoint at start.
    """

    def __init__(self, config: CoordinatorConfig, task: Task, spec: ParamSpec, model: torch.nn.Module,
                 optimizer: ServerOptimizer, eval_data: tuple[np.ndarray, np.ndarray] | None) -> None:
        self.config, self.task, self.spec, self.model, self.optimizer = config, task, spec, model, optimizer
        self.eval_data = eval_data
        self.residual: np.ndarray | None = (np.zeros(spec.size, dtype=np.float32) if config.downlink.compressed
                                            else None)

    def gate(self, vector: np.ndarray) -> float | None:
        """The loss of a candidate global model on the first ``evaluation.gate_samples``
        held-out samples (coordinator.evaluation.gate_loss); None without evaluation data."""
        return gate_loss(self.task, self.model, self.spec, vector, self.eval_data,
                         self.config.evaluation.gate_samples)

    def step(self, vector: np.ndarray, model_delta: np.ndarray, version: int, round_: int) -> tuple[bool, bytes | None]:
        """Step the global model ``vector`` (float32 ``(d,)``, the published one) in place with the
        aggregated ``model_delta`` (float32 ``(d,)``) into ``version``.

        Returns:
            ``(stepped, delta_blob)``: False when the new global model would be non-finite or
            evaluate to a non-finite loss (``vector`` and the optimizer state stay, the step
            fails); the compressed downlink's delta blob of ``version`` (also kept on disk
            before the checkpoint names the version), or None with a dense downlink.
        """
        if self.residual is None:
            return self._step(vector, model_delta, round_), None
        blob = self._step_compressed(vector, self.residual, model_delta, version, round_)
        return blob is not None, blob

    def _refuse(self, vector: np.ndarray, before: dict[str, np.ndarray], round_: int, loss: float | None) -> None:
        log.error("round %d: the new global model is non-finite or evaluates to loss %s: not published, "
                  "the round fails and the model stays", round_, loss)
        self.optimizer.load_state_arrays(before, self.spec.size)
        load_params(self.model, vector, self.spec)

    def _step(self, vector: np.ndarray, delta: np.ndarray, round_: int) -> bool:
        before = {k: v.copy() for k, v in self.optimizer.state_arrays().items()}
        candidate = vector.copy()
        self.optimizer.step(candidate, delta)
        loss = self.gate(candidate) if np.isfinite(candidate).all() else float("nan")
        if loss is not None and not np.isfinite(loss):
            self._refuse(vector, before, round_, loss)
            return False
        vector[:] = candidate
        return True

    def _step_compressed(self, vector: np.ndarray, residual: np.ndarray, model_delta: np.ndarray, version: int,
                         round_: int) -> bytes | None:
        """Step the server model ``published + residual``, compress its distance to the
        published model (fedmq.fl.downlink), move ``vector`` (the published model) in place and
        keep the delta blob on disk before the checkpoint names the version (a restart
        republishes it)."""
        before = {k: v.copy() for k, v in self.optimizer.state_arrays().items()}
        server = downlink.server_model(vector, residual)
        self.optimizer.step(server, model_delta)
        base_sha = params_sha256(vector)
        codec = self.config.warmup.apply(self.config.downlink.codec, round_)
        step = downlink.compress_step(vector, server, self.spec, codec) if np.isfinite(server).all() else None
        loss = self.gate(step.published) if step is not None else float("nan")
        if step is None or (loss is not None and not np.isfinite(loss)):
            self._refuse(vector, before, round_, loss)
            return None
        blob = DeltaBlob(codec.name, self.spec.hash, version - 1, version, base_sha,
                         params_sha256(step.published), step.payload).to_bytes()
        path = delta_path(self.config.state_dir, version)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, blob)
        vector[:] = step.published
        self.residual = step.residual
        return blob
