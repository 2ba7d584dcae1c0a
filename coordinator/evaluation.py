"""The coordinator's evaluation of each new global model, off the round's critical path.

Evaluating the McMahan CNN on 2,000 held-out MNIST images takes 1.5-3 s on one core, longer
than the rest of a round; done serially it delayed every next round by that much. A round
now does only a cheap *gate* (:func:`gate_loss`: the loss on the first ``gate_samples``
held-out samples, enough to refuse a global model whose loss is not finite before it is
published) and hands the full evaluation to :class:`BackgroundEvaluator`, one worker thread
with its own copy of the model, while the next round opens. The round's record gets its
test loss and accuracy when the evaluation finishes (``coordinator.service``).
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from fedmq.model.params import ParamSpec, load_params
from fedmq.tasks import Task

log = logging.getLogger(__name__)

#: (test loss, test accuracy); accuracy is None for a regression task.
Evaluation = tuple[float | None, float | None]


def evaluate_vector(task: Task, model: torch.nn.Module, spec: ParamSpec, vector: np.ndarray,
                    x: np.ndarray, y: np.ndarray, batch_size: int) -> Evaluation:
    """Load ``vector`` (float32, shape ``(spec.size,)``) into ``model`` and evaluate it on
    ``(x, y)`` with the task's loss; returns ``(loss, accuracy)``."""
    load_params(model, vector, spec)
    metrics = task.evaluate(model, x, y, batch_size=batch_size)
    return (metrics["loss"], metrics.get("accuracy"))


def gate_loss(task: Task, model: torch.nn.Module, spec: ParamSpec, vector: np.ndarray,
              data: tuple[np.ndarray, np.ndarray] | None, gate_samples: int) -> float | None:
    """The loss of ``vector`` on the first ``gate_samples`` samples of ``data`` (None when
    there is no evaluation data or ``gate_samples`` is 0): a global model whose gate loss is
    not finite is never published."""
    if data is None or gate_samples <= 0:
        return None
    x, y = data
    n = min(gate_samples, len(x))
    return evaluate_vector(task, model, spec, vector, x[:n], y[:n], batch_size=n)[0]


def gate_gradient(task: Task, model: torch.nn.Module, spec: ParamSpec, vector: np.ndarray,
                  data: tuple[np.ndarray, np.ndarray] | None, gate_samples: int) -> np.ndarray | None:
    """The gradient of the task's loss at ``vector`` on the same first ``gate_samples``
    held-out samples as :func:`gate_loss`: float32 ``(spec.size,)`` in spec order, zero for
    a parameter the loss does not reach; None when there is no evaluation data or
    ``gate_samples`` is 0. Costs one forward and backward pass over those samples (the CNN,
    256 samples: 0.23 s on one core of this 2-core machine under load).

    A secure round with ``ranking = "gradient"`` ranks its common support by its magnitude too
    (``coordinator.secure.plan_support``):
    the coordinator sees the devices' inputs only on the support it chose, so a ranking from
    its own last change never leaves the first round's random coordinates (issue #26: 1-4% of
    the MNIST CNN update's energy on the support, against 30% ranked by this gradient).
    """
    if data is None or gate_samples <= 0 or len(data[0]) == 0:
        return None
    x, y = data
    n = min(gate_samples, len(x))
    load_params(model, vector, spec)
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    model.eval()  # as the gate and the evaluation see the model (no dropout noise in the ranking)
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        out = task.fit_output(model(torch.as_tensor(x[:n], dtype=torch.float32)))
        task.loss_fn(out, task.target_tensor(y[:n])).backward()
    grad = np.zeros(spec.size, dtype=np.float32)
    for p, off, size in zip(params, spec.offsets, spec.sizes):
        if p.grad is not None:
            grad[off:off + size] = p.grad.detach().reshape(-1).to(torch.float32).cpu().numpy()
    model.zero_grad(set_to_none=True)
    return grad


class BackgroundEvaluator:
    """Evaluates global models on one worker thread, in the order submitted.

    Args:
        task: the federation's task (its loss and metrics).
        model: a module of the task's architecture owned by this evaluator (the round
            thread keeps using its own).
        spec: the model's ParamSpec.
        data: held-out ``(x, y)`` arrays (the task's dtypes).
        batch_size: samples per forward pass.
    """

    def __init__(self, task: Task, model: torch.nn.Module, spec: ParamSpec,
                 data: tuple[np.ndarray, np.ndarray], batch_size: int) -> None:
        self._task, self._model, self._spec = task, model, spec
        self._x, self._y = data
        self._batch_size = batch_size
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedmq-evaluation")

    def submit(self, vector: np.ndarray) -> Future[Evaluation]:
        """Evaluate a copy of ``vector`` (float32, ``(spec.size,)``); the caller may go on
        changing its own array."""
        snapshot = vector.copy()
        return self._pool.submit(self._run, snapshot)

    def _run(self, vector: np.ndarray) -> Evaluation:
        with torch.no_grad():
            return evaluate_vector(self._task, self._model, self._spec, vector, self._x, self._y, self._batch_size)

    def close(self, wait: bool = True) -> None:
        """Stop the worker (``wait``: after the submitted evaluations; else cancel them)."""
        self._pool.shutdown(wait=wait, cancel_futures=not wait)
