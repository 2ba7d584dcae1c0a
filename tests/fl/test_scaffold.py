"""Scaffold's maths (fedmq.fl.scaffold) against hand-computed cases, and its wire pieces."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import torch

from fedmq.codecs import CodecSpec, decode, decode_sparse, encode
from fedmq.fl.control_chain import ControlSnapshot
from fedmq.wire.envelope import ClientUpdate, decode_update, encode_update
from fedmq.errors import CodecError, NonFiniteError, SpecMismatchError, WireError
from fedmq.fl.scaffold import ControlSum, check_plan, control_update, package_control, server_control_step
from fedmq.fl.training import train_local
from fedmq.wire.messages import RoundTask, TrainPlan
from fedmq.model.params import ParamSpec


def test_control_update_is_option_ii_by_hand() -> None:
    # c_i+ = c_i - c + (x - y) / (K lr), with x - y = -update.
    got = control_update(np.array([1.0, 0.0], np.float32), np.array([0.5, 0.5], np.float32),
                         np.array([-0.2, 0.4], np.float32), steps=2, lr=0.1)
    np.testing.assert_allclose(got, [1.0 - 0.5 + 1.0, 0.0 - 0.5 - 2.0], rtol=1e-6)
    assert got.dtype == np.float32
    with pytest.raises(ValueError):
        control_update(np.zeros(2, np.float32), np.zeros(2, np.float32), np.zeros(2, np.float32), steps=0, lr=0.1)
    with pytest.raises(NonFiniteError):
        control_update(np.zeros(2, np.float32), np.array([np.nan, 0], np.float32), np.zeros(2, np.float32), 1, 0.1)
    with pytest.raises(SpecMismatchError):
        control_update(np.zeros(3, np.float32), np.zeros(2, np.float32), np.zeros(2, np.float32), 1, 0.1)


def test_the_local_step_follows_the_corrected_gradient_by_hand() -> None:
    # Linear(1 -> 2, no bias) at w = 0, one sample x = 1 of class 0: softmax (0.5, 0.5), so the
    # cross-entropy gradient is (p - onehot) x = (-0.5, 0.5). One step, lr 0.1, c - c_i = (1, -2):
    # y = 0 - 0.1 * ((-0.5, 0.5) + (1, -2)) = (-0.05, 0.15).
    model = torch.nn.Linear(1, 2, bias=False)
    torch.nn.init.zeros_(model.weight)
    plan = TrainPlan(local_steps=1, local_epochs=0, batch_size=1, lr=0.1)
    correction = np.array([1.0, -2.0], np.float32)
    res = train_local(model, np.ones((1, 1), np.float32), np.zeros(1, np.int64), plan,
                      rng=np.random.default_rng(0), correction=correction)
    np.testing.assert_allclose(res.update, [-0.05, 0.15], rtol=1e-6)
    # Option II with c_i = 0, c = (1, -2) gives back the true gradient at x: (-0.5, 0.5).
    ci = control_update(np.zeros(2, np.float32), correction, res.update, steps=res.steps, lr=plan.lr)
    np.testing.assert_allclose(ci, [-0.5, 0.5], rtol=1e-5)
    # Without a correction the same step is plain SGD.
    torch.nn.init.zeros_(model.weight)
    plain = train_local(model, np.ones((1, 1), np.float32), np.zeros(1, np.int64), plan, rng=np.random.default_rng(0))
    np.testing.assert_allclose(plain.update, [0.05, -0.05], rtol=1e-6)
    with pytest.raises(SpecMismatchError):
        train_local(model, np.ones((1, 1), np.float32), np.zeros(1, np.int64), plan, rng=np.random.default_rng(0),
                    correction=np.zeros(3, np.float32))


def test_the_server_step_divides_the_sum_by_the_fleet_size() -> None:
    # c + (|S| / N) mean(delta c_i) = c + sum / N: two changes (2, 4) and (0, 0) of a fleet of 4.
    total = ControlSum(2)
    total.add(decode_sparse("none", encode(np.array([2.0, 4.0], np.float32), _spec(2), CodecSpec.of(name="none")),
                            _spec(2)))
    total.add(decode_sparse("none", encode(np.zeros(2, np.float32), _spec(2), CodecSpec.of(name="none")), _spec(2)))
    assert total.count == 2
    got = server_control_step(np.array([0.0, 1.0], np.float32), total.total, fleet_size=4)
    np.testing.assert_allclose(got, [0.5, 2.0])
    with pytest.raises(ValueError):
        server_control_step(np.zeros(2, np.float32), total.total, 0)


def _spec(size: int) -> ParamSpec:
    return ParamSpec(("w",), ((size,),), ("float32",))


def test_a_sparse_change_adds_only_its_kept_entries() -> None:
    spec = _spec(5000)
    x = np.zeros(5000, np.float32)
    x[[3, 77, 4999]] = [1.0, -2.0, 0.5]
    sparse = decode_sparse("topk-int8", encode(x, spec, CodecSpec.of(density=0.001, dense_below=0)), spec)
    total = ControlSum(5000)
    total.add(sparse)
    total.add(sparse)
    np.testing.assert_allclose(total.total, 2 * sparse.to_dense(), rtol=1e-6)


def test_the_control_change_keeps_its_own_error_feedback() -> None:
    spec = _spec(4096 * 2)
    rng = np.random.default_rng(3)
    ci, residual, c = (rng.standard_normal(spec.size).astype(np.float32) for _ in range(3))
    update = rng.standard_normal(spec.size).astype(np.float32)
    codec = CodecSpec.of(density=0.01, dense_below=0)
    pkg = package_control(ci, residual, c, update, steps=4, lr=0.05, spec=spec, codec=codec)
    np.testing.assert_allclose(pkg.control, control_update(ci, c, update, 4, 0.05))
    np.testing.assert_array_equal(pkg.sent, decode("topk-int8", pkg.payload, spec))
    # Everything the coordinator gets plus the new residual is the change plus the old residual.
    np.testing.assert_allclose(pkg.sent + pkg.residual, (pkg.control - ci) + residual, atol=1e-5)
    assert np.count_nonzero(pkg.sent) < spec.size // 10
    off = package_control(ci, residual, c, update, steps=4, lr=0.05, spec=spec, codec=codec, error_feedback=False)
    np.testing.assert_array_equal(off.residual, residual)


def test_the_envelope_carries_the_control_payload_strictly() -> None:
    spec = _spec(64)
    none = CodecSpec.of(name="none")
    upd = ClientUpdate("f", "d", 1, 0, 10, "delta", spec.hash, "none", encode(np.ones(64, np.float32), spec, none))
    plain = encode_update(upd)
    assert b"control" not in plain and decode_update(plain, spec).control == b""
    control = encode(np.full(64, -1.0, np.float32), spec, none)
    both = decode_update(encode_update(ClientUpdate(**{**upd.__dict__, "control": control})), spec)
    np.testing.assert_array_equal(decode("none", both.control, spec), np.full(64, -1.0, np.float32))
    body = msgpack.unpackb(plain, raw=False)
    for bad, error, rule in ((b"", WireError, "R21"), ("text", WireError, "R21"),
                             (control[:-4], CodecError, "R23")):
        with pytest.raises(error, match=rf"\(rule {rule}\)$"):
            decode_update(msgpack.packb({**body, "control": bad}, use_bin_type=True), spec)


def test_the_plan_names_the_algorithm_and_old_tasks_mean_fedavg() -> None:
    assert TrainPlan().algorithm == "fedavg"
    TrainPlan(algorithm="scaffold").validate()
    for bad in (TrainPlan(algorithm="scafold"), TrainPlan(algorithm="scaffold", prox_mu=0.1),
                TrainPlan(algorithm="scaffold", update_kind="gradient")):
        with pytest.raises(WireError, match="rule R25"):
            bad.validate()
    task = RoundTask("f", "d", 1, 0, "0" * 16, 10.0, TrainPlan(algorithm="scaffold"))
    assert RoundTask.from_bytes(task.to_bytes()).plan.algorithm == "scaffold"
    body = msgpack.unpackb(task.to_bytes(), raw=False)
    del body["plan"]["algorithm"]  # a task from a coordinator that predates Scaffold
    assert RoundTask.from_bytes(msgpack.packb(body, use_bin_type=True)).plan.algorithm == "fedavg"
    with pytest.raises(ValueError, match="scaffold"):
        check_plan("scaffold", mode="async", secure=False, privacy=False)
    check_plan("fedavg", mode="async", secure=True, privacy=True)


def test_a_control_snapshot_is_verified() -> None:
    spec = _spec(10)
    vec = np.arange(10, dtype=np.float32)
    data = ControlSnapshot(spec.hash, 3, vec).to_bytes()
    got = ControlSnapshot.from_bytes(data, spec)
    assert got.version == 3 and np.array_equal(got.vector, vec)
    tampered = bytearray(data)
    tampered[-1] ^= 1
    with pytest.raises(WireError):
        ControlSnapshot.from_bytes(bytes(tampered), spec)
    with pytest.raises(WireError):
        ControlSnapshot.from_bytes(data[:-4], spec)
    with pytest.raises(SpecMismatchError):
        ControlSnapshot.from_bytes(data, _spec(11))
