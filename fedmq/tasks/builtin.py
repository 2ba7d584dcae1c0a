"""The built-in tasks: ordinary :class:`fedmq.tasks.Task` objects, looked up by short name.

* ``digits-mlp``: scikit-learn 8x8 digits, inputs 64 floats in [0, 1] (pixel / 16); MLP
  64-256-256-10, ReLU (85,002 parameters: large enough that 1% Top-K compression is worth it).
* ``digits-logreg``: multinomial logistic regression 64 -> 10 on the same digits.
* ``mnist-cnn``: the MNIST CNN of McMahan et al. 2017 ("Communication-Efficient Learning of
  Deep Networks from Decentralized Data"): conv5x5(32, padding 2)-ReLU-maxpool2-
  conv5x5(64, padding 2)-ReLU-maxpool2-fc512-ReLU-fc10, 1,663,370 parameters.
* ``mnist-logreg``: multinomial logistic regression 784 -> 10.

Pixel rules: digits inputs must already be floats in [0, 1] (the raw 0..16 integers are
refused: dividing them by 255 would be wrong); MNIST inputs are floats in [0, 1], and uint8
pixels are scaled by 1/255 (``integer_inputs="scale"``, the rule of the IDX loader).
No model here has buffers.
"""

from __future__ import annotations

from torch import nn

from fedmq.tasks.api import Task

#: Training settings ``fedmq demo`` sends. Chosen so that the digits demo reaches >= 90%
#: test accuracy in 30 rounds with Top-K 1% + error feedback.
DIGITS_PLAN = {"local_epochs": 5, "batch_size": 32, "lr": 0.1}
MNIST_PLAN = {"local_epochs": 1, "batch_size": 32, "lr": 0.05}


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


def _digits(name: str, build, description: str) -> Task:  # noqa: ANN001 - a module factory
    return Task(name=name, build=build, input_shape=(64,), num_classes=10, input_range=(0.0, 1.0),
                dataset="digits", demo_plan=DIGITS_PLAN, description=description)


def _mnist(name: str, build, description: str) -> Task:  # noqa: ANN001 - a module factory
    return Task(name=name, build=build, input_shape=(1, 28, 28), num_classes=10, input_range=(0.0, 1.0),
                integer_inputs="scale", dataset="mnist10k", demo_plan=MNIST_PLAN, description=description)


DIGITS_MLP = _digits("digits-mlp", _digits_mlp, "sklearn 8x8 digits, MLP 64-256-256-10 (ReLU)")
DIGITS_LOGREG = _digits("digits-logreg", _digits_logreg, "sklearn 8x8 digits, multinomial logistic regression 64->10")
MNIST_CNN = _mnist("mnist-cnn", _mnist_cnn, "MNIST CNN of McMahan et al. 2017 (1,663,370 parameters)")
MNIST_LOGREG = _mnist("mnist-logreg", _mnist_logreg, "MNIST multinomial logistic regression 784->10")
