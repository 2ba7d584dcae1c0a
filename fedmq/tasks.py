"""Task registry: the models fedmq trains and how they are evaluated.

A task fixes the model architecture (hence the :class:`fedmq.params.ParamSpec` that every
client update is checked against), the per-sample input shape, the number of classes and
the data set it trains on by default (a name understood by :func:`fedmq.data.load_split`).

No model here uses BatchNorm or any other layer with buffers: a client update carries only
trainable parameters (the ParamSpec), so running statistics would never be aggregated and
each device's model would silently drift from the global one.

Tasks:

* ``digits-mlp``: scikit-learn 8x8 digits, inputs 64 floats in [0, 1]; MLP 64-256-256-10,
  ReLU (85,002 parameters: large enough that 1% Top-K compression is worth it).
* ``digits-logreg``: multinomial logistic regression 64 -> 10 on the same digits.
* ``mnist-cnn``: the MNIST CNN of McMahan et al. 2017 ("Communication-Efficient Learning of
  Deep Networks from Decentralized Data"): conv5x5(32, padding 2)-ReLU-maxpool2-
  conv5x5(64, padding 2)-ReLU-maxpool2-fc512-ReLU-fc10, 1,663,370 parameters.
* ``mnist-logreg``: multinomial logistic regression 784 -> 10.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedmq.errors import ConfigError


@dataclass(frozen=True)
class TaskDef:
    """One learning task.

    Attributes:
        name: registry key, e.g. ``"digits-mlp"``.
        input_shape: shape of one sample (without the batch axis), e.g. ``(64,)`` or
            ``(1, 28, 28)``; inputs are float32.
        num_classes: number of classes; the model outputs float32 logits ``(N, num_classes)``
            and labels are int64 in ``[0, num_classes)``.
        dataset: default data set name (see :func:`fedmq.data.load_split`).
        factory: builds the untrained module (uses torch's global RNG; call
            :meth:`build_model` instead).
        description: one line for CLIs and reports.
    """

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    dataset: str
    factory: Callable[[], nn.Module]
    description: str

    def build_model(self, seed: int) -> nn.Module:
        """A freshly initialised model, identical for identical ``seed`` (torch's default
        initialisation drawn from ``torch.manual_seed(seed)``; the caller's global RNG state is
        left untouched). Returned in eval mode; float32 parameters on the CPU."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.factory()
        return model.float().eval()


def _digits_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def _digits_logreg() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 10))


def _mnist_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, kernel_size=5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, kernel_size=5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(7 * 7 * 64, 512), nn.ReLU(), nn.Linear(512, 10),
    )


def _mnist_logreg() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))


TASKS: dict[str, TaskDef] = {
    t.name: t
    for t in (
        TaskDef("digits-mlp", (64,), 10, "digits", _digits_mlp,
                "sklearn 8x8 digits, MLP 64-256-256-10 (ReLU)"),
        TaskDef("digits-logreg", (64,), 10, "digits", _digits_logreg,
                "sklearn 8x8 digits, multinomial logistic regression 64->10"),
        TaskDef("mnist-cnn", (1, 28, 28), 10, "mnist10k", _mnist_cnn,
                "MNIST CNN of McMahan et al. 2017 (1,663,370 parameters)"),
        TaskDef("mnist-logreg", (1, 28, 28), 10, "mnist10k", _mnist_logreg,
                "MNIST multinomial logistic regression 784->10"),
    )
}


def get_task(name: str) -> TaskDef:
    """The task called ``name``.

    Raises:
        ConfigError: unknown name (the message lists the known tasks).
    """
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}; expected one of {sorted(TASKS)}") from None


def evaluate(model: nn.Module, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor,
             batch_size: int = 1024) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy of ``model`` on ``(x, y)``, without gradients.

    Args:
        x: float32 ``(N, *input_shape)``.
        y: int64 ``(N,)`` class labels.
        batch_size: samples per forward pass (bounds memory only, not the result).

    Returns:
        ``(loss, accuracy)``: mean cross-entropy in nats per sample and the fraction of
        samples whose arg-max logit equals the label, both Python floats; ``(nan, nan)`` for
        an empty set. The model is put in eval mode.
    """
    xt = torch.as_tensor(x, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.int64)
    n = int(yt.shape[0])
    if n == 0:
        return float("nan"), float("nan")
    model.eval()
    loss_sum = 0.0
    correct = 0
    with torch.no_grad():
        for start in range(0, n, batch_size):
            logits = model(xt[start:start + batch_size])
            target = yt[start:start + batch_size]
            loss_sum += float(nn.functional.cross_entropy(logits, target, reduction="sum"))
            correct += int((logits.argmax(dim=1) == target).sum())
    return loss_sum / n, correct / n
