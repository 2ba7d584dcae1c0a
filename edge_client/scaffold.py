"""A device's side of Scaffold (``[plan] algorithm = "scaffold"``; :mod:`fedmq.fl.scaffold`).

The device keeps its control variate ``c_i`` and the error-feedback residual of its
control-variate changes in ``scaffold.safetensors`` in its state directory, written atomically
(:func:`fedmq.storage.atomic.atomic_write_bytes`, float32 tensors, never pickle). The file holds the
state before and after the round of one transfer::

    pre.c, pre.residual     c_i and the control residual before the round (float32 (d,))
    post.c, post.residual   c_i+ and the control residual after compressing delta c_i
    metadata                transfer_id, spec_hash

It is written before the update's in-flight record is committed
(:meth:`edge_client.state.DeviceState.begin_update`), and which half is in force is read from
the device ledger, the one commit point the update's residual uses too: ``post`` once the
ledger says the transfer was ``accepted``, ``pre`` otherwise (in flight, rolled back, or never
committed because the process died first). So ``c_i`` changes only with an accepted update,
and a refused one (rolled back, late, superseded) leaves ``c_i`` and the control residual as
they were before the round: the invariant ``sum of accepted sent changes + residual = c_i - 0``
holds across crashes. (The update's residual takes the refused update back instead, so the
model's progress is not lost; the refused round's ``delta c_i`` is recomputed from the next
round's training.)

The server control variate ``c`` is fetched through its own version chain
(:func:`fedmq.fl.control_chain.fetch_control`) for the task's model version, kept in memory
between rounds (a restart fetches it again).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from edge_client.state import DeviceState
from fedmq.storage.atomic import atomic_write_bytes
from fedmq.codecs import CodecSpec
from fedmq.fl.control_chain import fetch_control
from fedmq.errors import StateError
from fedmq.fl.scaffold import ControlPackage, package_control
from fedmq.fl.training import LocalResult
from fedmq.wire.messages import RoundTask
from fedmq.model.params import ParamSpec
from fedmq.transport import Link

FILE_NAME = "scaffold.safetensors"
_KEYS = ("pre.c", "pre.residual", "post.c", "post.residual")


def control_rng(seed: int, plan_seed: int, round_: int) -> np.random.Generator:
    """The generator of stochastic rounding of the control change (apart from the update's)."""
    return np.random.default_rng([int(seed), int(plan_seed), int(round_), 2])


class ScaffoldDevice:
    """The control variate of one device.

    Args:
        root: the device's state directory.
        spec: the model's ParamSpec.
        state: the device's durable state (its ledger says which half of the file is in force).

    Raises:
        StateError: (from the methods) ``scaffold.safetensors`` is corrupt (names the path).
    """

    def __init__(self, root: str | Path, spec: ParamSpec, state: DeviceState) -> None:
        self.path = Path(root) / FILE_NAME
        self.spec = spec
        self.state = state
        self._server: tuple[int, np.ndarray] | None = None
        self._trained_with: tuple[int, np.ndarray] | None = None
        self._prepared: tuple[np.ndarray, np.ndarray, ControlPackage] | None = None

    def _read(self) -> tuple[str, dict[str, np.ndarray]] | None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(f"{self.path}: unreadable ({exc})") from None
        try:
            tensors = st_load(data)
            header = int.from_bytes(data[:8], "little")
            meta = json.loads(data[8:8 + header]).get("__metadata__") or {}
        except (SafetensorError, ValueError, UnicodeDecodeError) as exc:
            raise StateError(f"{self.path}: not a readable Scaffold state ({exc}); move it away to start afresh") \
                from None
        if meta.get("spec_hash") != self.spec.hash:
            return None  # another model: its control variate means nothing here
        for key in _KEYS:
            arr = tensors.get(key)
            if arr is None or arr.dtype != np.float32 or arr.shape != (self.spec.size,) or not np.isfinite(arr).all():
                raise StateError(f"{self.path}: {key} missing or not a finite float32 ({self.spec.size},)")
        return str(meta.get("transfer_id", "")), tensors

    def committed(self) -> tuple[np.ndarray, np.ndarray]:
        """``(c_i, control residual)`` in force, float32 ``(d,)`` each: the file's ``post`` half
        when the ledger says its transfer was accepted, else its ``pre`` half (zeros without a file)."""
        read = self._read()
        if read is None:
            zeros = np.zeros(self.spec.size, dtype=np.float32)
            return zeros, zeros.copy()
        transfer, tensors = read
        states = [e.state for e in self.state.record.ledger if e.transfer_id == transfer]
        half = "post" if states and states[-1] == "accepted" else "pre"
        return tensors[f"{half}.c"], tensors[f"{half}.residual"]

    def correction(self, task: RoundTask, link: Link, fed: str, timeout: float) -> np.ndarray:
        """``c - c_i`` for ``task`` (float32 ``(d,)``), ``c`` fetched for the task's model version.

        Raises:
            TransferError / WireError: the server control variate could not be fetched.
            StateError: the state file is corrupt.
        """
        c = fetch_control(link, fed, self.spec, task.model_version, self._server, timeout)
        self._server = (task.model_version, c)
        self._trained_with = (task.round, c)
        c_i, _ = self.committed()
        return c - c_i

    def package(self, task: RoundTask, result: LocalResult, seed: int) -> bytes:
        """``delta c_i`` of the round just trained (with the ``c`` of :meth:`correction`),
        compressed with the control residual: the envelope's ``control`` payload. Nothing is
        written until :meth:`save`.

        Raises:
            NonFiniteError: the new control variate is non-finite (nothing changes).
            StateError: :meth:`correction` was not called for this round.
        """
        if self._trained_with is None or self._trained_with[0] != task.round:
            raise StateError(f"round {task.round}: Scaffold package without the server control variate")
        c_i, residual = self.committed()
        plan = task.plan
        pkg = package_control(c_i, residual, self._trained_with[1], result.update, steps=result.steps, lr=plan.lr,
                              spec=self.spec, codec=plan.codec, error_feedback=plan.error_feedback,
                              rng=control_rng(seed, plan.seed, task.round))
        self._prepared = (c_i, residual, pkg)
        return pkg.payload

    def save(self, transfer_id: str) -> None:
        """Write the round's before and after atomically for ``transfer_id`` (before the update's
        in-flight record is committed; the ledger then decides which half is in force).

        Raises:
            OSError: the state directory cannot be written.
            StateError: nothing was packaged since the last save (:meth:`package` first).
        """
        if self._prepared is None:
            raise StateError(f"{self.path}: no control-variate change packaged to save")
        c_i, residual, pkg = self._prepared
        tensors = {"pre.c": c_i, "pre.residual": residual, "post.c": pkg.control, "post.residual": pkg.residual}
        data = st_save({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()},
                       metadata={"transfer_id": transfer_id, "spec_hash": self.spec.hash})
        atomic_write_bytes(self.path, data)
        self._prepared = None
