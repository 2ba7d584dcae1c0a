"""A device's Scaffold state (edge_client/scaffold.py): committed with an accepted update only,
back to the round's start on a refusal, and across a process that died between the two writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_client.scaffold import FILE_NAME, ScaffoldDevice
from edge_client.state import DeviceState
from fedmq.errors import StateError
from fedmq.fl.feedback import ErrorFeedback
from fedmq.fl.training import LocalResult
from fedmq.wire.messages import RoundTask, TrainPlan
from fedmq.model.params import ParamSpec

SPEC = ParamSpec(("w",), ((6000,),), ("float32",))


def _round(dev: ScaffoldDevice, state: DeviceState, round_: int, transfer: str, c: np.ndarray,
           *, commit: bool = True) -> np.ndarray:
    """One Scaffold round as the agent runs it: package, save, begin_update. Returns c_i+."""
    task = RoundTask("f", "d", round_, round_ - 1, SPEC.hash, 1e12, TrainPlan(algorithm="scaffold", lr=0.1))
    dev._trained_with = (round_, c)  # what correction() sets after fetching c
    update = np.random.default_rng(round_).standard_normal(SPEC.size).astype(np.float32)
    result = LocalResult(update, "delta", 10, 4, 4, 0.1)
    dev.package(task, result, seed=0)
    pkg = dev._prepared[2]
    dev.save(transfer)
    if commit:
        state.begin_update(ErrorFeedback(SPEC), b"envelope", round=round_, transfer_id=transfer,
                           base_version=round_ - 1, deadline=1e12)
    return pkg.control


def test_the_control_variate_moves_only_with_an_accepted_update(tmp_path: Path) -> None:
    state = DeviceState(tmp_path)
    dev = ScaffoldDevice(tmp_path, SPEC, state)
    zeros = np.zeros(SPEC.size, np.float32)
    c = np.full(SPEC.size, 0.01, np.float32)
    ci, res = dev.committed()
    assert not ci.any() and not res.any()

    first = _round(dev, state, 1, "t1", c)
    assert not dev.committed()[0].any()          # in flight: not committed
    state.commit()                               # the accepted receipt
    np.testing.assert_array_equal(dev.committed()[0], first)
    residual_after_first = dev.committed()[1]
    assert residual_after_first.any()            # what the codec dropped of delta c_i

    _round(dev, state, 2, "t2", c)
    state.rollback(ErrorFeedback(SPEC), np.zeros(SPEC.size, np.float32), "late")   # refused
    ci, res = dev.committed()
    np.testing.assert_array_equal(ci, first)     # back to the round's start, residual too
    np.testing.assert_array_equal(res, residual_after_first)

    # A process killed after the state file, before the in-flight record: nothing changed.
    _round(dev, state, 3, "t3", c, commit=False)
    again = ScaffoldDevice(tmp_path, SPEC, DeviceState(tmp_path))
    np.testing.assert_array_equal(again.committed()[0], first)
    assert not np.array_equal(first, zeros)


def test_a_restart_reads_the_half_the_ledger_settles(tmp_path: Path) -> None:
    state = DeviceState(tmp_path)
    dev = ScaffoldDevice(tmp_path, SPEC, state)
    post = _round(dev, state, 1, "t1", np.zeros(SPEC.size, np.float32))
    state.commit()
    state = DeviceState(tmp_path)
    restarted = ScaffoldDevice(tmp_path, SPEC, state)
    np.testing.assert_array_equal(restarted.committed()[0], post)
    # A coordinator rerun of the round asks again; its refusal leaves c_i at the round's start.
    state.reopen(2e12)
    assert not restarted.committed()[0].any()
    state.rollback(ErrorFeedback(SPEC), np.zeros(SPEC.size, np.float32), "late")
    assert not restarted.committed()[0].any()


def test_another_model_or_a_corrupt_file(tmp_path: Path) -> None:
    state = DeviceState(tmp_path)
    dev = ScaffoldDevice(tmp_path, SPEC, state)
    _round(dev, state, 1, "t1", np.zeros(SPEC.size, np.float32))
    state.commit()
    smaller = ParamSpec(("v",), ((10,),), ("float32",))
    assert not ScaffoldDevice(tmp_path, smaller, state).committed()[0].any()
    (tmp_path / FILE_NAME).write_bytes(b"garbage")
    with pytest.raises(StateError, match=FILE_NAME):
        dev.committed()
    with pytest.raises(StateError):
        ScaffoldDevice(tmp_path, SPEC, state).package(
            RoundTask("f", "d", 5, 4, SPEC.hash, 1e12, TrainPlan(algorithm="scaffold")),
            LocalResult(np.zeros(SPEC.size, np.float32), "delta", 1, 1, 1, 0.0), seed=0)
