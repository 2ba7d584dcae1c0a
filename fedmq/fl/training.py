"""Local training on a device: the functional core of the edge agent (and of in-process
benchmarks), free of MQTT, files and clocks other than the time cap.

Two kinds of client update (sign conventions in docs/architecture.md):

* ``delta`` (FedAvg, McMahan et al. 2017): plain local SGD (no momentum) from the global
  model ``w_global`` for the planned steps; the update is ``w_local - w_global``. The
  server's pseudo-gradient is ``-mean(delta)`` (Reddi et al. 2020). With ``prox_mu > 0``
  each step also follows the FedProx proximal term ``(mu / 2) ||w - w_global||^2``
  (Li et al. 2020), pulling the local model toward the global one.
* ``gradient`` (FedSGD): the mean of the minibatch gradients over the planned local
  batches, all taken at ``w_global`` without stepping; the server applies the step. The
  proximal term is zero at ``w_global`` and so plays no part.

Batches come from one permutation of the local samples per epoch drawn from the caller's
``rng``; the last batch of an epoch may be smaller. ``local_steps`` counts batches (and may
run over several epochs), ``local_epochs`` counts passes over the local data.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.nn import functional as F

from fedmq.errors import ConfigError, DataError, SpecMismatchError
from fedmq.wire.messages import TrainPlan
from fedmq.model.params import ParamSpec, flatten_params, load_params
from fedmq.tasks import Task, evaluate


@dataclass(frozen=True)
class LocalResult:
    """Outcome of :func:`train_local`.

    Attributes:
        update: float32 ``(spec.size,)`` client update in ParamSpec order (``delta`` or
            mean ``gradient``, see the module docstring).
        kind: ``"delta"`` or ``"gradient"``.
        samples: number of local training samples (the aggregation weight).
        steps: minibatch steps actually done (fewer than planned when the time cap hit).
        planned_steps: minibatch steps the plan asked for.
        seconds: wall-clock training time, seconds (evaluation excluded).
        metrics: ``train_loss`` (mean minibatch loss over the steps done: the task's loss,
            cross-entropy in nats without a task; the proximal term excluded); ``val_loss``
            and ``val_<metric>`` (``val_accuracy``; ``val_mae``, ``val_rmse`` for
            regression) of the resulting local model on the held-out set when one was given.
    """

    update: np.ndarray
    kind: str
    samples: int
    steps: int
    planned_steps: int
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)


def _batches(n: int, batch_size: int, rng: np.random.Generator) -> Iterator[torch.Tensor]:
    while True:
        perm = torch.from_numpy(rng.permutation(n))
        yield from torch.split(perm, batch_size)


def planned_steps(n: int, plan: TrainPlan) -> int:
    """Minibatch steps ``plan`` asks for on ``n`` local samples: ``local_steps``, or
    ``local_epochs * ceil(n / batch_size)``."""
    if plan.local_steps > 0:
        return plan.local_steps
    return plan.local_epochs * math.ceil(n / plan.batch_size)


def train_local(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, plan: TrainPlan, *,
                global_vector: np.ndarray | None = None, rng: np.random.Generator,
                max_seconds: float | None = None, x_val: np.ndarray | None = None,
                y_val: np.ndarray | None = None, task: Task | None = None,
                correction: np.ndarray | None = None) -> LocalResult:
    """Train ``model`` on the local data and return the client update.

    Args:
        model: the task's module. With ``kind == "delta"`` it ends at the local model
            ``w_local``; with ``"gradient"`` its parameters are left at ``w_global``.
        x: float32 ``(N, *input_shape)`` local samples; y: int64 ``(N,)`` labels, or float32
            ``(N, *target_shape)`` targets of a regression task.
        plan: update kind, ``local_steps`` / ``local_epochs``, ``batch_size``, ``lr``,
            ``prox_mu``, ``max_seconds`` (0 = no cap) are used; codec fields are not.
        global_vector: float32 ``(spec.size,)`` global model to train from; it is loaded into
            ``model`` first. ``None``: the model's current parameters are the global model.
        rng: source of the per-epoch shuffles.
        max_seconds: a further time cap, seconds (the smaller of this and
            ``plan.max_seconds`` applies). Training stops after the step during which the cap
            is reached; at least one step is always done.
        x_val, y_val: optional held-out set for ``val_loss`` / ``val_accuracy``.
        task: the model's task, for its loss (:meth:`fedmq.tasks.Task.loss_fn`) and
            metrics; ``None``: cross-entropy classification.
        correction: float32 ``(spec.size,)`` added to every minibatch gradient of a ``delta``
            update: Scaffold's ``c - c_i`` (:mod:`fedmq.fl.scaffold`); None: none.

    Returns:
        :class:`LocalResult`.

    Raises:
        WireError: the plan is invalid (``TrainPlan.validate``).
        DataError: no local samples, or ``x`` and ``y`` differ in length.
        SpecMismatchError: ``global_vector`` or ``correction`` does not fit the model.
    """
    plan.validate()
    n = len(y)
    if n == 0 or len(x) != n:
        raise DataError(f"local training needs samples: got x of {len(x)} and y of {n}")
    spec = ParamSpec.from_module(model)
    if global_vector is not None:
        load_params(model, global_vector, spec)
        w_global = np.array(global_vector, dtype=np.float32)
    else:
        w_global = flatten_params(model, spec)
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    caps = [c for c in (plan.max_seconds, max_seconds) if c]
    cap = min(caps) if caps else None
    planned = planned_steps(n, plan)
    kind = plan.update_kind
    prox = kind == "delta" and plan.prox_mu > 0
    anchors = [p.detach().clone() for p in params] if prox else []
    shifts: list[torch.Tensor] = []
    if correction is not None and kind == "delta":
        flat = torch.from_numpy(np.ascontiguousarray(correction, dtype=np.float32))
        if flat.shape != (spec.size,):
            raise SpecMismatchError(f"correction of shape {tuple(flat.shape)}, expected ({spec.size},)")
        shifts = [t.view_as(p) for t, p in zip(torch.split(flat, [p.numel() for p in params]), params)]

    xt = torch.as_tensor(x, dtype=torch.float32)
    yt = task.target_tensor(y) if task is not None else torch.as_tensor(y, dtype=torch.int64)
    loss_of = task.loss_fn if task is not None else F.cross_entropy
    model.train()
    for p in params:
        p.grad = None
    loss_sum = torch.zeros((), dtype=torch.float64)
    steps = 0
    start = time.monotonic()
    for idx in _batches(n, plan.batch_size, rng):
        loss = loss_of(model(xt[idx]), yt[idx])
        if kind == "delta":
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for i, (p, g) in enumerate(zip(params, grads)):
                    if prox:
                        g = g.add(p - anchors[i], alpha=plan.prox_mu)
                    if shifts:
                        g = g.add(shifts[i])
                    p.add_(g, alpha=-plan.lr)
        else:
            # backward() sums into .grad across batches; divided by the step count below.
            loss.backward()
        loss_sum += loss.detach()
        steps += 1
        if steps >= planned or (cap is not None and time.monotonic() - start >= cap):
            break
    seconds = time.monotonic() - start
    model.eval()

    if kind == "delta":
        update = flatten_params(model, spec) - w_global
    else:
        # A parameter the loss does not reach has no .grad; its gradient is zero.
        update = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                            for p in params]).div_(steps).numpy().astype(np.float32)
        for p in params:
            p.grad = None
    metrics = {"train_loss": float(loss_sum) / steps}
    if x_val is not None and y_val is not None and len(y_val) > 0:
        if task is not None:
            metrics.update({f"val_{k}": v for k, v in task.evaluate(model, x_val, y_val).items()})
        else:
            metrics["val_loss"], metrics["val_accuracy"] = evaluate(model, x_val, y_val)
    return LocalResult(update=update, kind=kind, samples=n, steps=steps, planned_steps=planned,
                       seconds=seconds, metrics=metrics)


def split_holdout(x: np.ndarray, y: np.ndarray, fraction: float, seed: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Split a device's data into local training and held-out parts.

    ``default_rng(seed).permutation(N)``; the last ``round(fraction * N)`` positions are
    held out (at least 1 and at most N - 1 when ``fraction > 0`` and N >= 2).

    Returns:
        ``(x_train, y_train, x_val, y_val)``.

    Raises:
        ConfigError: ``fraction`` outside [0, 1).
    """
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"holdout fraction must be in [0, 1), got {fraction}")
    n = len(y)
    n_val = int(round(fraction * n))
    if fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    train, val = perm[:n - n_val], perm[n - n_val:]
    return x[train], y[train], x[val], y[val]
