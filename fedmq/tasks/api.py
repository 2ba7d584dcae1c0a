"""The task API: what a user writes to federate their own model on their own devices' data.

A :class:`Task` names a model builder, the shape of one input sample, what the model
predicts (classes or real values), how a device reads its local data and what values that
data may hold. fedmq checks all of it at start (:meth:`Task.check_model`,
:meth:`Task.check_data`), so a wrong shape, dtype, label or value range is an error that
names the configuration file, the option and what was expected, never a silent mis-train.
docs/tasks.md is the reference, with a worked example and the data-format rules.

Why buffers that change in training are refused: a client update carries only the
trainable parameters (the ParamSpec, docs/wire-format.md); buffers travel with the global
model only, coordinator to device. BatchNorm running statistics updated on a device would
never be aggregated and each device's model would silently drift from the global one.
Constant buffers (a registered mean/std, a mask) are fine.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedmq.errors import ConfigError, DataError, FedmqError, WireError

#: torch's default generator is one per process: agents on threads of one process (the fleet,
#: the in-process demo) seeding it at once would draw each other's initial weights, and then
#: version 0 built on a device would not match the coordinator's.
_SEEDED_BUILD = threading.Lock()

#: What a model predicts.
KINDS = ("classification", "regression")
#: How integer-typed inputs (e.g. uint8 pixels) are treated; see :class:`Task`.
INTEGER_RULES = ("refuse", "scale", "as-is")

Split = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _default_load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``.npz`` with arrays ``x`` and ``y`` (no pickle), or a folder of MNIST IDX files."""
    from fedmq.data import load_mnist_dir, load_npz

    if path.is_dir():
        prefix = "train" if any(path.glob("train-images-idx3-ubyte*")) else "t10k"
        return load_mnist_dir(path, prefix)
    if path.is_file():
        return load_npz(path, convert=False)
    raise DataError(f"{path}: data file not found (expected an .npz file with arrays x and y, "
                    "or a folder of MNIST IDX files)")


def _default_save(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    from fedmq.data import save_npz_atomic

    save_npz_atomic(path, x, y)


@dataclass(frozen=True)
class Task:
    """One learning task: model, data format, loss and metrics.

    Attributes:
        name: the task's own name, 1-64 chars (what a device reports in its status and what
            the coordinator matches devices on; the reference used in configurations may
            differ, e.g. ``mypkg.task:task``).
        build: zero-argument function returning an untrained ``torch.nn.Module`` (uses
            torch's global RNG; call :meth:`build_model`). Its trainable parameters are the
            ParamSpec; buffers that change in training are refused (module docstring).
        input_shape: shape of one sample without the batch axis, e.g. ``(64,)``,
            ``(1, 28, 28)``, ``(1, 1460)``; the model takes float32 ``(N, *input_shape)``.
        kind: ``"classification"`` (model outputs float32 logits ``(N, num_classes)``,
            labels int64 ``(N,)`` in ``[0, num_classes)``) or ``"regression"`` (model
            outputs ``(N, *target_shape)``, or ``(N, prod(target_shape))``, reshaped;
            targets float32 ``(N, *target_shape)``).
        num_classes: classes, >= 2 (classification only).
        target_shape: shape of one regression target, ``()`` for a scalar (regression only).
        load_data: ``load_data(path) -> (x, y)``: the device's local samples from whatever it
            has (a file, a folder, a CSV, an SQLite log a sensor appends to); ``path`` is the
            configured ``data`` path, unresolved beyond the configuration's folder. Default:
            an ``.npz`` with arrays ``x``, ``y`` or a folder of MNIST IDX files. It may raise
            anything: fedmq reports it as a DataError naming the path and option.
        save_data: ``save_data(path, x, y)``: writes a partition in the format
            ``load_data`` reads (used by ``fedmq demo`` to give each device its data).
            Default: ``.npz``. A task with its own ``load_data`` and no ``save_data``
            cannot run in the demo.
        data_file: file name the demo writes a device's data to (default ``data.npz``).
        input_range: ``(low, high)``: every input value must lie in it (after the integer
            rule), else the data is refused. ``None``: no range check (values must be finite).
        integer_inputs: integer-typed ``x`` (e.g. uint8 images): ``"refuse"`` (default;
            the loader must return floats), ``"scale"`` (unsigned ints divided by their
            dtype's maximum: uint8 pixels / 255 into [0, 1]; signed ints refused) or
            ``"as-is"`` (cast to float32: counts, ids).
        target_range: ``(low, high)`` bound on regression targets, or ``None``.
        loss: ``loss(output, target) -> scalar tensor``, the mean over the batch. Default:
            cross-entropy (nats) for classification, mean squared error for regression.
        metrics: ``metrics(output, target) -> {name: float}`` over a whole evaluation set
            (all outputs at once), added to the built-in ones.
        example_inputs: ``example_inputs(n) -> float32 (n, *input_shape)`` for ONNX export and
            the start-time model check. Default: seeded uniform values in ``input_range``,
            else standard normal.
        reference_data: ``() -> (x_train, y_train, x_test, y_test)``: a data set the demo
            partitions over its devices and the coordinator evaluates on
            (``evaluation.data = "task"``). ``None``: use ``dataset``.
        dataset: name of a fedmq data split (:func:`fedmq.data.load_split`) used when
            ``reference_data`` is None.
        demo_plan: training settings ``fedmq demo`` sends (``local_epochs``,
            ``batch_size``, ``lr`` ...; :class:`fedmq.wire.messages.TrainPlan` fields).
        description: one line for CLIs and reports.
    """

    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    kind: Literal["classification", "regression"] = "classification"
    num_classes: int = 0
    target_shape: tuple[int, ...] = ()
    load_data: Callable[[Path], tuple[Any, Any]] | None = None
    save_data: Callable[[Path, np.ndarray, np.ndarray], None] | None = None
    data_file: str = "data.npz"
    input_range: tuple[float, float] | None = None
    integer_inputs: Literal["refuse", "scale", "as-is"] = "refuse"
    target_range: tuple[float, float] | None = None
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    metrics: Callable[[torch.Tensor, torch.Tensor], Mapping[str, float]] | None = None
    example_inputs: Callable[[int], np.ndarray] | None = None
    reference_data: Callable[[], Split] | None = None
    dataset: str = ""
    demo_plan: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.name, str) or not 1 <= len(self.name) <= 64 or any(c.isspace() for c in self.name):
            problems.append(f"name {self.name!r} must be 1-64 characters without spaces")
        if not callable(self.build):
            problems.append("build must be a function returning a torch.nn.Module")
        if not (isinstance(self.input_shape, tuple) and self.input_shape
                and all(isinstance(d, int) and d >= 1 for d in self.input_shape)):
            problems.append(f"input_shape {self.input_shape!r} must be a non-empty tuple of ints >= 1")
        if self.kind not in KINDS:
            problems.append(f"kind {self.kind!r} must be one of {KINDS}")
        if self.kind == "classification" and not (isinstance(self.num_classes, int) and self.num_classes >= 2):
            problems.append(f"num_classes {self.num_classes!r} must be an int >= 2 for classification")
        if not (isinstance(self.target_shape, tuple) and all(isinstance(d, int) and d >= 1 for d in self.target_shape)):
            problems.append(f"target_shape {self.target_shape!r} must be a tuple of ints >= 1")
        if self.integer_inputs not in INTEGER_RULES:
            problems.append(f"integer_inputs {self.integer_inputs!r} must be one of {INTEGER_RULES}")
        for attr in ("input_range", "target_range"):
            r = getattr(self, attr)
            if r is not None and not (len(r) == 2 and float(r[0]) < float(r[1])):
                problems.append(f"{attr} {r!r} must be (low, high) with low < high")
        if problems:
            raise ConfigError(f"task {self.name!r}: " + "; ".join(problems))

    # -- the model --------------------------------------------------------------------------

    def build_model(self, seed: int) -> nn.Module:
        """A freshly initialised model, identical for identical ``seed`` (torch's default
        initialisation drawn from ``torch.manual_seed(seed)``; the caller's global RNG state
        is left untouched; thread-safe against other calls). Returned in eval mode; float32
        parameters on the CPU.

        Raises:
            ConfigError: ``build`` did not return a ``torch.nn.Module``.
        """
        with _SEEDED_BUILD, torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.build()
        if not isinstance(model, nn.Module):
            raise ConfigError(f"task {self.name!r}: build() returned {type(model).__name__}, expected a "
                              "torch.nn.Module")
        return model.float().eval()

    def example_batch(self, n: int = 2) -> np.ndarray:
        """float32 ``(n, *input_shape)`` example inputs (see ``example_inputs``)."""
        if self.example_inputs is not None:
            x = np.asarray(self.example_inputs(n), dtype=np.float32)
        else:
            rng = np.random.default_rng(0)
            shape = (n, *self.input_shape)
            if self.input_range is not None:
                lo, hi = self.input_range
                x = rng.uniform(lo, hi, size=shape).astype(np.float32)
            else:
                x = rng.standard_normal(shape, dtype=np.float32)
        if x.shape != (n, *self.input_shape):
            raise ConfigError(f"task {self.name!r}: example_inputs({n}) has shape {x.shape}, expected "
                              f"{(n, *self.input_shape)}")
        return x

    def output_shape(self, n: int) -> tuple[int, ...]:
        """Shape of the model's output for ``n`` samples, as the loss sees it."""
        return (n, self.num_classes) if self.kind == "classification" else (n, *self.target_shape)

    def fit_output(self, out: torch.Tensor) -> torch.Tensor:
        """The model's output shaped as the loss expects (regression outputs
        ``(N, prod(target_shape))`` are reshaped to ``(N, *target_shape)``)."""
        if self.kind == "regression":
            return out.reshape(out.shape[0], *self.target_shape)
        return out

    def check_model(self, where: str = "") -> nn.Module:
        """Build the model and check it against the task; returns it (seed 0).

        Checks: ``build`` returns a module whose trainable parameters form a valid
        ParamSpec; no BatchNorm keeps running statistics; no buffer changes in a
        training-mode forward pass on :meth:`example_batch`; the output has the shape of
        :meth:`output_shape`.

        Raises:
            ConfigError: any check fails (the message starts with ``where``).
        """
        from fedmq.model.params import ParamSpec

        prefix = f"{where}: " if where else ""
        who = f"{prefix}task {self.name!r}"
        try:
            model = self.build_model(0)
        except FedmqError:
            raise
        except Exception as exc:
            raise ConfigError(f"{who}: build() failed: {type(exc).__name__}: {exc}") from None
        try:
            ParamSpec.from_module(model)
        except WireError as exc:
            raise ConfigError(f"{who}: the model's trainable parameters are not a valid ParamSpec ({exc})") from None
        for name, module in model.named_modules():
            if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
                raise ConfigError(
                    f"{who}: module {name or '(root)'!r} ({type(module).__name__}) keeps running statistics, "
                    "buffers that change in training and are never aggregated (docs/wire-format.md); use "
                    "GroupNorm / LayerNorm or track_running_stats=False")
        x = torch.from_numpy(self.example_batch(2))
        before = {k: b.detach().clone() for k, b in model.named_buffers()}
        try:
            model.train()
            with torch.no_grad():
                model(x)
            model.eval()
            with torch.no_grad():
                out = model(x)
        except Exception as exc:
            raise ConfigError(f"{who}: the model fails on example inputs of shape {tuple(x.shape)} "
                              f"(input_shape {self.input_shape}): {type(exc).__name__}: {exc}") from None
        for k, b in model.named_buffers():
            if k in before and not torch.equal(before[k], b):
                raise ConfigError(f"{who}: buffer {k!r} changes in training; client updates carry only trainable "
                                  "parameters (docs/wire-format.md), so it would never be aggregated")
        want = self.output_shape(2)
        if not isinstance(out, torch.Tensor) or (tuple(out.shape) != want and not (
                self.kind == "regression" and out.ndim >= 1 and out.numel() == math.prod(want))):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ConfigError(f"{who}: model output for 2 samples is {got}, expected {want}")
        return model.eval()

    # -- data -------------------------------------------------------------------------------

    def check_data(self, x: Any, y: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
        """Check and convert local data against the task (rules in docs/tasks.md).

        Args:
            x: samples ``(N, *input_shape)`` or ``(N, prod(input_shape))`` (reshaped), float
                or (by ``integer_inputs``) integer typed.
            y: labels int ``(N,)`` in ``[0, num_classes)`` (classification) or float targets
                ``(N, *target_shape)`` (regression).
            where: what to name in errors, e.g. ``"edge.toml: option 'data' (data.npz)"``.

        Returns:
            ``(x, y)``: x float32 ``(N, *input_shape)``; y int64 ``(N,)`` or float32
            ``(N, *target_shape)``; N >= 1.

        Raises:
            DataError: naming ``where`` and what was expected.
        """
        def fail(msg: str) -> DataError:
            return DataError(f"{where}: {msg} (task {self.name!r})")

        try:
            x = np.asarray(x)
            y = np.asarray(y)
        except Exception as exc:
            raise fail(f"x and y must be arrays ({exc})") from None
        if x.ndim < 1 or y.ndim < 1 or len(x) != len(y):
            raise fail(f"x {x.shape} and y {y.shape} must have the same first dimension N")
        n = len(y)
        if n == 0:
            raise fail("no samples")
        if np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_:
            if self.integer_inputs == "refuse":
                raise fail(f"x has integer dtype {x.dtype}; expected floats (scale pixels to [0, 1] in the loader, "
                           "or declare integer_inputs='scale' or 'as-is')")
            if self.integer_inputs == "scale":
                if not np.issubdtype(x.dtype, np.unsignedinteger):
                    raise fail(f"x has dtype {x.dtype}; integer_inputs='scale' divides unsigned integers by "
                               "their maximum (uint8 / 255), signed ones are refused")
                x = x.astype(np.float32) / np.float32(np.iinfo(x.dtype).max)
        elif not np.issubdtype(x.dtype, np.floating):
            raise fail(f"x has dtype {x.dtype}, expected float (or integer per integer_inputs)")
        x = x.astype(np.float32, copy=False)
        if tuple(x.shape[1:]) != self.input_shape:
            if math.prod(x.shape[1:]) != math.prod(self.input_shape):
                raise fail(f"samples of shape {tuple(x.shape[1:])}, expected {self.input_shape}")
            x = x.reshape((n, *self.input_shape))
        if not np.isfinite(x).all():
            raise fail("x contains NaN or infinite values")
        if self.input_range is not None:
            lo, hi = self.input_range
            xmin, xmax = float(x.min()), float(x.max())
            if xmin < lo or xmax > hi:
                raise fail(f"x values in [{xmin:g}, {xmax:g}], expected within the declared input_range "
                           f"[{lo:g}, {hi:g}]")
        if self.kind == "classification":
            if y.ndim != 1:
                raise fail(f"labels of shape {y.shape}, expected (N,)")
            if not np.issubdtype(y.dtype, np.integer):
                if not (np.issubdtype(y.dtype, np.floating) and np.isfinite(y).all() and (y == np.round(y)).all()):
                    raise fail(f"labels have dtype {y.dtype}, expected integer class labels")
            y = y.astype(np.int64)
            if int(y.min()) < 0 or int(y.max()) >= self.num_classes:
                bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
                raise fail(f"label {bad} out of range, expected 0..{self.num_classes - 1} ({self.num_classes} classes)")
        else:
            if not (np.issubdtype(y.dtype, np.floating) or np.issubdtype(y.dtype, np.integer)):
                raise fail(f"targets have dtype {y.dtype}, expected numbers")
            y = y.astype(np.float32)
            if tuple(y.shape[1:]) != self.target_shape:
                if math.prod(y.shape[1:]) != math.prod(self.target_shape):
                    raise fail(f"targets of shape {tuple(y.shape[1:])}, expected {self.target_shape}")
                y = y.reshape((n, *self.target_shape))
            if not np.isfinite(y).all():
                raise fail("targets contain NaN or infinite values")
            if self.target_range is not None:
                lo, hi = self.target_range
                if float(y.min()) < lo or float(y.max()) > hi:
                    raise fail(f"targets in [{float(y.min()):g}, {float(y.max()):g}], expected within "
                               f"target_range [{lo:g}, {hi:g}]")
        return x, y

    def load_local(self, path: str | os.PathLike[str], where: str = "") -> tuple[np.ndarray, np.ndarray]:
        """The device's data: ``load_data(path)`` then :meth:`check_data`.

        Raises:
            DataError: the loader failed (any exception it raised, with its message) or the
                data does not fit; the message names ``where`` and ``path``.
        """
        path = Path(path)
        label = f"{where} ({path})" if where else str(path)
        loader = self.load_data or _default_load
        try:
            x, y = loader(path)
        except FedmqError as exc:
            raise DataError(f"{where}: {exc}" if where else str(exc)) from None
        except Exception as exc:
            raise DataError(f"{label}: the task's data loader failed: {type(exc).__name__}: {exc}") from None
        return self.check_data(x, y, label)

    def write_local(self, path: str | os.PathLike[str], x: np.ndarray, y: np.ndarray) -> None:
        """Write a device's partition with ``save_data`` (the demo's use).

        Raises:
            ConfigError: the task has its own ``load_data`` but no ``save_data``.
        """
        if self.save_data is None:
            if self.load_data is not None:
                raise ConfigError(f"task {self.name!r} reads its own data format (load_data) but has no save_data "
                                  "to write the demo's partitions in it")
            _default_save(Path(path), x, y)
        else:
            self.save_data(Path(path), x, y)

    def reference_split(self) -> Split:
        """``(x_train, y_train, x_test, y_test)`` of the task's reference data set, checked.

        Raises:
            ConfigError: the task has neither ``reference_data`` nor ``dataset``.
            DataError: the data does not fit the task.
        """
        if self.reference_data is not None:
            x_tr, y_tr, x_te, y_te = self.reference_data()
        elif self.dataset:
            from fedmq.data import load_split

            x_tr, y_tr, x_te, y_te = load_split(self.dataset)
        else:
            raise ConfigError(f"task {self.name!r} has no reference data set (reference_data or dataset)")
        x_tr, y_tr = self.check_data(x_tr, y_tr, f"task {self.name!r} reference training data")
        x_te, y_te = self.check_data(x_te, y_te, f"task {self.name!r} reference test data")
        return x_tr, y_tr, x_te, y_te

    # -- loss and metrics -------------------------------------------------------------------

    def target_tensor(self, y: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``y`` as the loss expects it: int64 labels or float32 targets."""
        return torch.as_tensor(y, dtype=torch.int64 if self.kind == "classification" else torch.float32)

    def loss_fn(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean loss over the batch (``loss``, or cross-entropy in nats / mean squared error)."""
        output = self.fit_output(output)
        if self.loss is not None:
            return self.loss(output, target)
        if self.kind == "classification":
            return F.cross_entropy(output, target)
        return F.mse_loss(output, target)

    def evaluate(self, model: nn.Module, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor,
                 batch_size: int = 1024) -> dict[str, float]:
        """Loss and metrics of ``model`` on ``(x, y)``, without gradients, in eval mode.

        Returns:
            ``loss`` (mean of :meth:`loss_fn` over samples), then ``accuracy`` (fraction of
            arg-max predictions equal to the label) for classification, ``mae`` and ``rmse``
            (in the targets' units) for regression, then the task's own ``metrics``. All NaN
            for an empty set.
        """
        xt = torch.as_tensor(x, dtype=torch.float32)
        yt = self.target_tensor(y)
        n = int(yt.shape[0])
        names = ["loss"] + (["accuracy"] if self.kind == "classification" else ["mae", "rmse"])
        if n == 0:
            return {k: float("nan") for k in names}
        model.eval()
        loss_sum = 0.0
        outputs = []
        with torch.no_grad():
            for start in range(0, n, batch_size):
                out = self.fit_output(model(xt[start:start + batch_size]))
                target = yt[start:start + batch_size]
                loss_sum += float(self.loss_fn(out, target)) * len(target)
                outputs.append(out)
        out = torch.cat(outputs)
        result = {"loss": loss_sum / n}
        if self.kind == "classification":
            result["accuracy"] = float((out.argmax(dim=1) == yt).double().mean())
        else:
            err = (out - yt).double()
            result["mae"] = float(err.abs().mean())
            result["rmse"] = float(err.pow(2).mean().sqrt())
        if self.metrics is not None:
            result.update({str(k): float(v) for k, v in self.metrics(out, yt).items()})
        return result
