"""The task API: lookup (module:attribute, built-in, entry point), start-time checks, loss
and metrics, data that grows, ONNX export of user tasks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edge_client.localdata import LocalData
from fedmq.errors import ConfigError, DataError
from fedmq.fl.training import train_local
from fedmq.wire.messages import TrainPlan
from fedmq.model.modelio import OnnxPredictor, export_onnx
from fedmq.tasks import TASKS, Task, get_task, known_tasks

from conftest import child_env, make_entry_point_dist  # type: ignore[import-not-found]


def test_module_attribute_and_builtin_lookup() -> None:
    task = get_task("userpkg.sensors:classify")
    assert task.name == "user-classify" and task.num_classes == 3
    assert get_task("digits-mlp") is TASKS["digits-mlp"]
    assert get_task(task) is task


def test_entry_point_lookup(tmp_path: Path) -> None:
    site = make_entry_point_dist(tmp_path / "site", "user-regress-ep", "userpkg.sensors:regress")
    sys.path.insert(0, str(site))
    try:
        assert "user-regress-ep" in known_tasks()
        assert get_task("user-regress-ep").name == "user-regress"
    finally:
        sys.path.remove(str(site))
    with pytest.raises(ConfigError, match="unknown task 'user-regress-ep'"):
        get_task("user-regress-ep")


@pytest.mark.parametrize(("ref", "match"), [
    ("userpkg.broken:task", r"edge.toml: option 'task': cannot import task module 'userpkg.broken' .*fedmq_no_such"),
    ("userpkg.nowhere:task", r"cannot import task module 'userpkg.nowhere'"),
    ("userpkg.sensors:missing", r"module 'userpkg.sensors' has no attribute 'missing'"),
    ("userpkg.sensors:not_a_task", r"is a str, expected a fedmq.tasks.Task"),
    ("no-such-task", r"unknown task 'no-such-task'; expected .*digits-mlp"),
])
def test_lookup_errors_name_the_option_and_module(ref: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        get_task(ref, where="edge.toml: option 'task'")


def test_batchnorm_and_changing_buffers_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"'1' \(BatchNorm1d\) keeps running statistics"):
        get_task("userpkg.sensors:with_batchnorm")

    class Counter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.register_buffer("seen", torch.zeros(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.training:
                self.seen += len(x)
            return self.lin(x)

    with pytest.raises(ConfigError, match="buffer 'seen' changes in training"):
        Task(name="counter", build=Counter, input_shape=(2,), num_classes=2).check_model()
    with pytest.raises(ConfigError, match=r"output for 2 samples is \(2, 2\), expected \(2, 3\)"):
        Task(name="wrong-out", build=lambda: nn.Linear(2, 2), input_shape=(2,), num_classes=3).check_model()


def test_data_checks_name_where_and_what_was_expected() -> None:
    task = get_task("userpkg.sensors:classify")
    where = "edge.toml: option 'data'"
    with pytest.raises(DataError, match=r"edge.toml: option 'data': samples of shape \(9,\), expected \(8,\)"):
        task.check_data(np.zeros((4, 9), np.float32), np.zeros(4, np.int64), where)
    with pytest.raises(DataError, match=r"label 3 out of range, expected 0..2"):
        task.check_data(np.zeros((4, 8), np.float32), np.array([0, 1, 2, 3]), where)
    with pytest.raises(DataError, match=r"integer dtype uint8; expected floats"):
        task.check_data(np.zeros((4, 8), np.uint8), np.zeros(4, np.int64), where)
    x, _ = task.check_data(np.zeros((4, 2, 4), np.float32), np.zeros(4, np.int64), where)
    assert x.shape == (4, 8)


def test_pixel_rule_and_value_range() -> None:
    mnist = get_task("mnist-logreg")
    x, y = mnist.check_data(np.full((2, 784), 255, np.uint8), np.array([1, 2]), "w")
    assert x.dtype == np.float32 and x.shape == (2, 1, 28, 28) and float(x.max()) == 1.0
    with pytest.raises(DataError, match=r"x values in \[255, 255\], expected within the declared input_range \[0, 1\]"):
        mnist.check_data(np.full((2, 784), 255.0, np.float32), np.array([1, 2]), "w")
    with pytest.raises(DataError, match="integer dtype"):
        get_task("digits-mlp").check_data(np.full((2, 64), 16, np.uint8), np.array([1, 2]), "w")
    with pytest.raises(DataError, match=r"expected within the declared input_range \[-1, 1\]"):
        get_task("userpkg.sensors:regress").check_data(np.full((2, 4), 2.0), np.zeros(2), "w")


def test_regression_task_learns() -> None:
    task = get_task("userpkg.sensors:regress")
    x_tr, y_tr, x_te, y_te = task.reference_split()
    model = task.build_model(0)
    before = task.evaluate(model, x_te, y_te)
    assert set(before) == {"loss", "mae", "rmse"}
    result = train_local(model, x_tr, y_tr, TrainPlan(local_epochs=5, batch_size=16, lr=0.05),
                         rng=np.random.default_rng(0), x_val=x_te, y_val=y_te, task=task)
    after = task.evaluate(model, x_te, y_te)
    assert after["loss"] < 0.1 * before["loss"]
    assert result.metrics["val_rmse"] == pytest.approx(after["rmse"])
    assert after["rmse"] == pytest.approx(after["loss"] ** 0.5, rel=1e-4)


def test_local_data_is_reloaded_when_it_grows(tmp_path: Path) -> None:
    task = get_task("userpkg.sensors:regress")
    x, y, _, _ = task.reference_split()
    path = tmp_path / "data.csv"
    task.write_local(path, x[:50], y[:50])
    local = LocalData(path, task, where="edge.toml: option 'data'", holdout_fraction=0.1, seed=0)
    assert local.samples == 50 and local.loads == 1
    assert local.refresh() is False and local.loads == 1
    with open(path, "a", encoding="utf-8") as fh:  # the sensor appends readings
        np.savetxt(fh, np.column_stack([x[50:80], y[50:80]]), delimiter=",")
    assert local.refresh() is True and local.samples == 80 and len(local.y) + len(local.y_val) == 80
    with open(path, "a", encoding="utf-8") as fh:  # a half-written line keeps the data read before
        fh.write("0.1,0.2,")
    assert local.refresh() is False and local.samples == 80


@pytest.mark.parametrize("ref", ["userpkg.sensors:classify", "userpkg.sensors:regress"])
def test_onnx_export_of_user_tasks_matches_torch(ref: str, tmp_path: Path) -> None:
    task = get_task(ref)
    model = task.build_model(1)
    x = task.reference_split()[2][:17]
    predictor = OnnxPredictor(export_onnx(model, task, tmp_path / "model.onnx"))
    assert predictor.kind == task.kind and predictor.task == task.name
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    got = predictor.logits(x)
    np.testing.assert_allclose(got.reshape(want.shape), want, rtol=1e-5, atol=1e-5)
    np.save(tmp_path / "x.npy", x)
    out = subprocess.run([sys.executable, "-m", "edge_client", "predict", "--model", str(tmp_path / "model.onnx"),
                          "--input", str(tmp_path / "x.npy")], capture_output=True, text=True, env=child_env(),
                         timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split()
    if task.kind == "regression":
        np.testing.assert_allclose(np.array(lines, dtype=np.float32), want.reshape(-1), rtol=1e-4, atol=1e-4)
    else:
        assert [int(v) for v in lines] == list(want.argmax(axis=1))


def test_models_built_on_many_threads_at_once_are_the_seeded_model() -> None:
    import threading

    from fedmq.model.params import ParamSpec, flatten_params

    task = get_task("digits-mlp")

    def vector() -> np.ndarray:
        model = task.build_model(0)
        return flatten_params(model, ParamSpec.from_module(model))

    want = vector()
    built: list[np.ndarray] = []
    for _ in range(5):
        start = threading.Barrier(6)

        def build() -> None:
            start.wait()
            built.append(vector())

        threads = [threading.Thread(target=build) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(built) == 30 and all(np.array_equal(v, want) for v in built)
