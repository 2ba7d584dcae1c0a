"""The full evaluation of each new global model runs off the round's critical path: the next
round opens while it runs, and every round still gets its test loss and accuracy."""

from __future__ import annotations

import io
import threading
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from coordinator.evaluation import gate_gradient, gate_loss
from coordinator.metrics import CoordinatorMetrics
from fedmq.model.params import ParamSpec, flatten_params
from fedmq.tasks import Task, get_task
from fleet.demo import DemoSettings, Scheduling, run_demo

ROUNDS = 3


class _OpenWatch(CoordinatorMetrics):
    """The coordinator's metrics, also telling when each round opened."""

    def __init__(self) -> None:
        super().__init__()
        self.opened: defaultdict[int, threading.Event] = defaultdict(threading.Event)

    def observe(self, event) -> None:  # noqa: ANN001 - coordinator.service.Progress
        super().observe(event)
        if event.kind == "round_open":
            self.opened[event.round].set()


def test_the_next_round_opens_while_the_last_model_is_evaluated(tmp_path: Path, monkeypatch) -> None:
    watch = _OpenWatch()
    original = Task.evaluate
    background: list[int] = []
    overlapped: list[bool] = []

    def evaluate(self, model, x, y, batch_size=1024):  # noqa: ANN001, ANN202 - Task.evaluate's signature
        if threading.current_thread().name.startswith("fedmq-evaluation"):
            background.append(len(x))
            evaluated_round = len(background)
            if evaluated_round < ROUNDS:
                # Serial evaluation would block here: round r + 1 opens only after it returns.
                overlapped.append(watch.opened[evaluated_round + 1].wait(timeout=60))
        return original(self, model, x, y, batch_size)

    monkeypatch.setattr(Task, "evaluate", evaluate)
    out = run_demo(DemoSettings(
        devices=3, per_round=2, rounds=ROUNDS, task="digits-mlp", data="digits", seed=0, deadline_s=300.0,
        broker="memory", devices_in="threads", publish_onnx=False,
        scheduling=Scheduling(over_selection=1.0, min_devices=3, min_updates=2), out=tmp_path, write_files=False),
        console=Console(file=io.StringIO()), metrics=watch)

    assert overlapped == [True] * (ROUNDS - 1)
    # The whole held-out set, once per new global model, on the evaluation thread.
    assert len(background) == ROUNDS and len(set(background)) == 1 and background[0] > 256
    assert out["rounds_failed"] == 0
    accuracies = [r["test_accuracy"] for r in out["records"]]
    assert all(a is not None for a in accuracies) and accuracies == out["accuracy_per_round"][-ROUNDS:]
    assert out["final_accuracy"] == accuracies[-1] > out["initial_accuracy"]


def test_the_gate_is_the_loss_on_the_first_samples() -> None:
    task = get_task("digits-mlp")
    model = task.build_model(0)
    spec = ParamSpec.from_module(model)
    vector = flatten_params(model, spec)
    x = np.random.default_rng(0).random((300, 64), dtype=np.float32)
    y = np.arange(300) % 10
    assert gate_loss(task, model, spec, vector, None, 256) is None
    assert gate_loss(task, model, spec, vector, (x, y), 0) is None
    assert gate_loss(task, model, spec, vector, (x, y), 100) == pytest.approx(task.evaluate(model, x[:100], y[:100])["loss"])
    bad = vector.copy()
    bad[:1000] = 3e38  # finite parameters whose logits overflow
    assert not np.isfinite(gate_loss(task, model, spec, bad, (x, y), 100))


def test_the_gate_gradient_is_the_loss_gradient_on_the_first_samples() -> None:
    """What a secure round ranks its common support by (issue #26): a small step against it
    lowers the gate loss, it does not depend on the samples past gate_samples, and there is
    none without evaluation data."""
    task = get_task("digits-mlp")
    model = task.build_model(0)
    spec = ParamSpec.from_module(model)
    vector = flatten_params(model, spec)
    rng = np.random.default_rng(0)
    x = rng.random((300, 64), dtype=np.float32)
    y = np.arange(300) % 10
    assert gate_gradient(task, model, spec, vector, None, 256) is None
    assert gate_gradient(task, model, spec, vector, (x, y), 0) is None
    grad = gate_gradient(task, model, spec, vector, (x, y), 100)
    assert grad is not None and grad.shape == (spec.size,) and grad.dtype == np.float32
    assert np.abs(grad).max() > 0
    step = vector - np.float32(0.1) * grad
    assert gate_loss(task, model, spec, step, (x, y), 100) < gate_loss(task, model, spec, vector, (x, y), 100)
    x2 = x.copy()
    x2[100:] = rng.random((200, 64), dtype=np.float32)
    np.testing.assert_array_equal(gate_gradient(task, model, spec, vector, (x2, y), 100), grad)
