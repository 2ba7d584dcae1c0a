"""Local training: update kinds, FedProx, time cap, held-out split, on the real digits data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from fedmq.fl.training import planned_steps, split_holdout, train_local
from fedmq.data import digits_split
from fedmq.errors import ConfigError, DataError, SpecMismatchError, WireError
from fedmq.wire.messages import TrainPlan
from fedmq.model.params import flatten_params
from fedmq.tasks import evaluate, get_task


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return digits_split()


def device_data(digits, n: int = 150) -> tuple[np.ndarray, np.ndarray]:
    return digits[0][:n], digits[1][:n]


def test_delta_training_reduces_loss_and_moves_the_model_by_the_delta(digits) -> None:
    x, y = device_data(digits)
    model = get_task("digits-mlp").build_model(0)
    w_global = flatten_params(model)
    loss_before, acc_before = evaluate(model, x, y)
    plan = TrainPlan(local_epochs=20, batch_size=32, lr=0.1)
    result = train_local(model, x, y, plan, rng=np.random.default_rng(0), x_val=digits[2], y_val=digits[3])
    loss_after, acc_after = evaluate(model, x, y)
    assert loss_after < 0.5 * loss_before and acc_after > acc_before + 0.3
    assert result.kind == "delta" and result.samples == 150
    assert result.steps == result.planned_steps == 20 * 5
    assert result.update.dtype == np.float32 and result.update.shape == w_global.shape
    np.testing.assert_allclose(flatten_params(model), w_global + result.update, atol=1e-6)
    assert result.metrics["train_loss"] > 0
    assert (result.metrics["val_loss"], result.metrics["val_accuracy"]) == pytest.approx(
        evaluate(model, digits[2], digits[3]))
    assert result.seconds >= 0 and not model.training


def test_training_is_deterministic_in_the_rng(digits) -> None:
    x, y = device_data(digits)
    plan = TrainPlan(local_steps=7, local_epochs=0, batch_size=16, lr=0.05)
    a = train_local(get_task("digits-mlp").build_model(0), x, y, plan, rng=np.random.default_rng(4))
    b = train_local(get_task("digits-mlp").build_model(0), x, y, plan, rng=np.random.default_rng(4))
    c = train_local(get_task("digits-mlp").build_model(0), x, y, plan, rng=np.random.default_rng(5))
    assert np.array_equal(a.update, b.update)
    assert not np.array_equal(a.update, c.update)


def test_global_vector_is_the_starting_point(digits) -> None:
    x, y = device_data(digits)
    w_global = flatten_params(get_task("digits-mlp").build_model(9))
    model = get_task("digits-mlp").build_model(0)
    result = train_local(model, x, y, TrainPlan(local_steps=3, local_epochs=0, lr=0.05), global_vector=w_global,
                         rng=np.random.default_rng(0))
    np.testing.assert_allclose(flatten_params(model) - w_global, result.update, atol=1e-6)
    reference = get_task("digits-mlp").build_model(9)
    expected = train_local(reference, x, y, TrainPlan(local_steps=3, local_epochs=0, lr=0.05), rng=np.random.default_rng(0))
    np.testing.assert_allclose(result.update, expected.update, atol=1e-7)
    with pytest.raises(SpecMismatchError):
        train_local(model, x, y, TrainPlan(), global_vector=w_global[:-1], rng=np.random.default_rng(0))


def test_one_gradient_step_is_minus_the_one_step_delta_over_lr(digits) -> None:
    x, y = device_data(digits)
    lr = 0.1
    delta = train_local(get_task("digits-mlp").build_model(0), x, y, TrainPlan(local_steps=1, local_epochs=0, lr=lr),
                        rng=np.random.default_rng(3))
    model = get_task("digits-mlp").build_model(0)
    w_global = flatten_params(model)
    grad = train_local(model, x, y, TrainPlan(update_kind="gradient", local_steps=1, local_epochs=0, lr=lr),
                       rng=np.random.default_rng(3))
    assert grad.kind == "gradient" and grad.steps == 1
    np.testing.assert_allclose(grad.update, -delta.update / lr, atol=1e-5)
    assert np.array_equal(flatten_params(model), w_global)  # FedSGD: the device does not step
    assert all(p.grad is None for p in model.parameters())


def test_gradient_is_the_mean_of_the_minibatch_gradients(digits) -> None:
    x, y = device_data(digits, 96)
    model = get_task("digits-logreg").build_model(0)
    result = train_local(model, x, y, TrainPlan(update_kind="gradient", local_epochs=1, batch_size=32),
                         rng=np.random.default_rng(0))
    assert result.steps == 3
    # Three equal batches covering the data once: their mean gradient is the full-batch gradient.
    loss = F.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
    full = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))]).numpy()
    np.testing.assert_allclose(result.update, full, atol=1e-6)


def test_fedprox_pulls_toward_the_global_model(digits) -> None:
    x, y = device_data(digits)
    plan = TrainPlan(local_epochs=5, lr=0.1)
    plain = train_local(get_task("digits-mlp").build_model(0), x, y, plan, rng=np.random.default_rng(1))
    prox = train_local(get_task("digits-mlp").build_model(0), x, y, TrainPlan(local_epochs=5, lr=0.1, prox_mu=1.0),
                       rng=np.random.default_rng(1))
    assert np.linalg.norm(prox.update) < 0.8 * np.linalg.norm(plain.update)
    assert np.linalg.norm(prox.update) > 0


def test_time_cap_stops_training_early(digits) -> None:
    x, y = device_data(digits)
    capped = train_local(get_task("digits-mlp").build_model(0), x, y, TrainPlan(local_steps=10_000, local_epochs=0),
                         rng=np.random.default_rng(0), max_seconds=1e-9)
    assert capped.steps == 1 and capped.planned_steps == 10_000
    assert np.linalg.norm(capped.update) > 0
    from_plan = train_local(get_task("digits-mlp").build_model(0), x, y,
                            TrainPlan(local_steps=10_000, local_epochs=0, max_seconds=1e-9), rng=np.random.default_rng(0))
    assert from_plan.steps == 1
    np.testing.assert_allclose(from_plan.update, capped.update, atol=1e-7)


def test_step_counting() -> None:
    assert planned_steps(100, TrainPlan(local_epochs=2, batch_size=32)) == 8
    assert planned_steps(100, TrainPlan(local_steps=3, local_epochs=0)) == 3


def test_bad_inputs(digits) -> None:
    model = get_task("digits-mlp").build_model(0)
    x, y = device_data(digits)
    with pytest.raises(WireError, match="local_steps"):
        train_local(model, x, y, TrainPlan(local_steps=2, local_epochs=2), rng=np.random.default_rng(0))
    with pytest.raises(DataError, match="samples"):
        train_local(model, x[:0], y[:0], TrainPlan(), rng=np.random.default_rng(0))
    with pytest.raises(DataError):
        train_local(model, x[:5], y[:4], TrainPlan(), rng=np.random.default_rng(0))


def test_split_holdout(digits) -> None:
    x, y = device_data(digits, 101)
    x_tr, y_tr, x_val, y_val = split_holdout(x, y, 0.2, seed=3)
    assert (len(y_tr), len(y_val)) == (81, 20)
    rows = {r.tobytes() for r in x}
    assert {r.tobytes() for r in x_tr} | {r.tobytes() for r in x_val} == rows
    assert not {r.tobytes() for r in x_tr} & {r.tobytes() for r in x_val}
    again = split_holdout(x, y, 0.2, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(again, (x_tr, y_tr, x_val, y_val)))
    assert len(split_holdout(x[:2], y[:2], 0.01, seed=0)[3]) == 1
    assert len(split_holdout(x, y, 0.0, seed=0)[3]) == 0
    with pytest.raises(ConfigError, match="fraction"):
        split_holdout(x, y, 1.0, seed=0)
