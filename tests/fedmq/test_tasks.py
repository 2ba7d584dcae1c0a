"""Task registry: architectures, deterministic initialisation, evaluation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from fedmq.errors import ConfigError
from fedmq.model.params import ParamSpec
from fedmq.tasks import TASKS, evaluate, get_task


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_holds_the_documented_tasks() -> None:
    assert {"digits-mlp", "digits-logreg", "mnist-cnn", "mnist-logreg"} <= set(TASKS)
    assert get_task("mnist-cnn").input_shape == (1, 28, 28)
    assert get_task("digits-mlp").input_shape == (64,)
    assert get_task("digits-mlp").dataset == "digits"
    assert get_task("mnist-cnn").dataset == "mnist10k"


def test_unknown_task_names_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="digits-mlp"):
        get_task("resnet-1000")


def test_parameter_counts_follow_the_architectures() -> None:
    # McMahan et al. 2017's MNIST CNN with 'same' padding: 1,663,370 parameters.
    assert n_params(get_task("mnist-cnn").build_model(0)) == 1_663_370
    assert n_params(get_task("digits-mlp").build_model(0)) == (64 * 256 + 256) + (256 * 256 + 256) + (256 * 10 + 10)
    assert n_params(get_task("mnist-logreg").build_model(0)) == 784 * 10 + 10
    assert n_params(get_task("digits-logreg").build_model(0)) == 64 * 10 + 10


@pytest.mark.parametrize("name", sorted(TASKS))
def test_models_map_a_batch_to_logits_and_have_no_buffers(name: str) -> None:
    task = get_task(name)
    model = task.build_model(0)
    out = model(torch.zeros((3, *task.input_shape)))
    assert out.shape == (3, task.num_classes) and out.dtype == torch.float32
    # Client updates carry trainable parameters only, so a buffer would never be aggregated.
    assert list(model.state_dict()) == [n for n, _ in model.named_parameters()]


@pytest.mark.parametrize("name", sorted(TASKS))
def test_build_model_is_deterministic_in_the_seed(name: str) -> None:
    task = get_task(name)
    a, b, c = task.build_model(7), task.build_model(7), task.build_model(8)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters()))
    assert ParamSpec.from_module(a).hash == ParamSpec.from_module(c).hash


def test_build_model_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    get_task("digits-mlp").build_model(5)
    assert torch.equal(torch.rand(4), expected)


def test_evaluate_counts_correct_predictions_and_mean_loss() -> None:
    model = get_task("digits-logreg").build_model(0)
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.zero_()
        for c in range(10):
            model[0].weight[c, c] = 10.0
    x = np.zeros((40, 64), dtype=np.float32)
    y = np.arange(40, dtype=np.int64) % 10
    x[np.arange(40), y] = 1.0
    y_wrong = y.copy()
    y_wrong[:8] = (y_wrong[:8] + 1) % 10  # 8 of 40 labels disagree with the model
    loss, acc = evaluate(model, x, y_wrong, batch_size=7)
    assert acc == pytest.approx(32 / 40)
    with torch.no_grad():
        logits = model(torch.from_numpy(x))
    assert loss == pytest.approx(float(F.cross_entropy(logits, torch.from_numpy(y_wrong))), rel=1e-6)
    assert evaluate(model, x, y_wrong, batch_size=1024) == pytest.approx((loss, acc), rel=1e-6)


def test_evaluate_on_an_empty_set_is_nan() -> None:
    loss, acc = evaluate(get_task("digits-mlp").build_model(0), np.zeros((0, 64), np.float32), np.zeros(0, np.int64))
    assert math.isnan(loss) and math.isnan(acc)
