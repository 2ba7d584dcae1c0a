"""Tasks: the models fedmq trains, the data they train on, and how a configuration names them.

A configuration's ``task`` option names a :class:`Task` in one of three ways, looked up in
this order by :func:`get_task`:

1. ``package.module:attribute``: the attribute (a :class:`Task`) of an importable module.
   The current folder is importable too (appended to ``sys.path``, after installed
   packages), so a project made by ``fedmq new`` runs from the folder holding it.
2. a built-in short name (:data:`BUILTIN`): ``digits-mlp``, ``digits-logreg``,
   ``mnist-cnn``, ``mnist-logreg``, ``acsf1-cnn`` (fedmq.tasks.appliances, the smart-plug
   example; its data set needs ``fedmq[iot]``, its devices do not);
3. a short name registered by an installed package in the ``fedmq.tasks`` entry-point
   group, e.g. in its pyproject.toml::

       [project.entry-points."fedmq.tasks"]
       my-model = "mypkg.task:task"

Every task found is checked once per process (:meth:`Task.check_model`): a module that
fails to import, an attribute that is not a Task, or a model with training-time buffers
is a :class:`fedmq.errors.ConfigError` naming where the reference came from (the
configuration file and option).

docs/tasks.md documents the API, the data-format rules and a worked example.
"""

from __future__ import annotations

import importlib
import os
import sys
from importlib.metadata import entry_points

import numpy as np
import torch

from fedmq.errors import ConfigError, FedmqError
from fedmq.tasks.api import INTEGER_RULES, KINDS, Task
from fedmq.tasks.builtin import DIGITS_LOGREG, DIGITS_MLP, MNIST_CNN, MNIST_LOGREG

__all__ = ["BUILTIN", "ENTRY_POINT_GROUP", "INTEGER_RULES", "KINDS", "TASKS", "Task", "evaluate", "get_task",
           "known_tasks"]

#: Entry-point group third-party packages register task short names in.
ENTRY_POINT_GROUP = "fedmq.tasks"

#: The core built-in tasks (always importable with the base install).
TASKS: dict[str, Task] = {t.name: t for t in (DIGITS_MLP, DIGITS_LOGREG, MNIST_CNN, MNIST_LOGREG)}

#: Every built-in short name and the ``module:attribute`` it stands for.
BUILTIN: dict[str, str] = {
    "digits-mlp": "fedmq.tasks.builtin:DIGITS_MLP",
    "digits-logreg": "fedmq.tasks.builtin:DIGITS_LOGREG",
    "mnist-cnn": "fedmq.tasks.builtin:MNIST_CNN",
    "mnist-logreg": "fedmq.tasks.builtin:MNIST_LOGREG",
    "acsf1-cnn": "fedmq.tasks.appliances:task",
}

# Tasks already checked in this process, by identity (a check builds the model once).
_checked: set[int] = set()


def known_tasks() -> list[str]:
    """Built-in short names and those registered through the ``fedmq.tasks`` entry points."""
    return sorted(set(BUILTIN) | {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def _import_attribute(ref: str, where: str) -> object:
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{where}: {ref!r} is not 'package.module:attribute'")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{where}: cannot import task module {module_name!r} ({type(exc).__name__}: {exc}); "
                          "expected an importable module (installed, on PYTHONPATH, or in the current "
                          "folder)") from None
    except Exception as exc:
        raise ConfigError(f"{where}: importing task module {module_name!r} failed: "
                          f"{type(exc).__name__}: {exc}") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{where}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def get_task(ref: str | Task, *, where: str | None = None) -> Task:
    """The task a configuration names (module docstring for the lookup order), checked.

    Args:
        ref: ``package.module:attribute``, a short name, or a :class:`Task` (checked and
            returned).
        where: what to name in errors, e.g. ``"edge.toml: option 'task'"`` (default
            ``"task 'REF'"``).

    Raises:
        ConfigError: unknown short name (the message lists the known ones), a module that
            fails to import (names the module), an attribute that is missing or not a Task,
            or a model that fails :meth:`Task.check_model`.
    """
    where = where or f"task {ref!r}"
    if isinstance(ref, Task):
        task = ref
    else:
        if not isinstance(ref, str) or not ref:
            raise ConfigError(f"{where}: expected a task name or 'package.module:attribute', got {ref!r}")
        if ":" in ref:
            obj = _import_attribute(ref, where)
        elif ref in BUILTIN:
            obj = _import_attribute(BUILTIN[ref], where)
        else:
            found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == ref]
            if not found:
                raise ConfigError(f"{where}: unknown task {ref!r}; expected 'package.module:attribute' or one of "
                                  f"{known_tasks()}")
            try:
                obj = found[0].load()
            except ImportError as exc:
                raise ConfigError(f"{where}: task {ref!r} is registered as {found[0].value!r} by an entry point, "
                                  f"but it cannot be imported ({type(exc).__name__}: {exc})") from None
            except FedmqError:
                raise
            except Exception as exc:
                raise ConfigError(f"{where}: loading task {ref!r} ({found[0].value!r}) failed: "
                                  f"{type(exc).__name__}: {exc}") from None
        if not isinstance(obj, Task):
            raise ConfigError(f"{where}: {ref!r} is a {type(obj).__name__}, expected a fedmq.tasks.Task")
        task = obj
    if id(task) not in _checked:
        task.check_model(where)
        _checked.add(id(task))
    return task


def evaluate(model: torch.nn.Module, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor,
             batch_size: int = 1024) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy of a classifier on ``(x, y)``, without gradients.

    The classification case of :meth:`Task.evaluate` for callers without a task (the
    built-in tasks are all classifiers).

    Args:
        x: float32 ``(N, *input_shape)``. y: int64 ``(N,)`` class labels.
        batch_size: samples per forward pass (bounds memory only, not the result).

    Returns:
        ``(loss, accuracy)``: mean cross-entropy in nats per sample and the fraction of
        samples whose arg-max logit equals the label; ``(nan, nan)`` for an empty set.
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
            loss_sum += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
            correct += int((logits.argmax(dim=1) == target).sum())
    return loss_sum / n, correct / n
