"""Error feedback: the conservation invariant, rollback, and the residual on disk."""

from __future__ import annotations

import io

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedmq.codecs import CodecSpec, decode
from fedmq.errors import NonFiniteError, SpecMismatchError, StateError
from fedmq.fl.feedback import ErrorFeedback
from fedmq.model.params import ParamSpec

SPEC = ParamSpec(("conv.weight", "conv.bias", "fc.weight"), ((8, 1, 5, 5), (8,), (10, 300)),
                 ("float32",) * 3)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rounds=st.lists(st.tuples(st.integers(0, 2**31), st.sampled_from([1e-3, 1.0, 50.0]),
                                 st.sampled_from(["keep", "rollback_now", "rollback_later"])),
                       min_size=1, max_size=12),
       density=st.sampled_from([0.002, 0.05, 0.5]), stochastic=st.booleans(),
       codec=st.sampled_from(["topk-int8", "topk-int8", "none"]))
def test_received_plus_residual_equals_sum_of_updates(  # type: ignore[no-untyped-def]
        rounds, density, stochastic, codec) -> None:
    cfg = CodecSpec.from_table(codec, dict(density=density, block_size=32, dense_below=16, stochastic=stochastic))
    ef = ErrorFeedback(SPEC)
    rng = np.random.default_rng(0)
    truth = np.zeros(SPEC.size, dtype=np.float64)
    received = np.zeros(SPEC.size, dtype=np.float64)
    pending: list[np.ndarray] = []
    bound = 0.0
    for seed, scale, fate in rounds:
        update = (np.random.default_rng(seed).standard_normal(SPEC.size) * scale).astype(np.float32)
        truth += update
        bound += float(np.abs(update).max())
        payload, sent = ef.compress(update, cfg, rng=rng)
        # what the device keeps for rollback is exactly what the coordinator decodes
        np.testing.assert_array_equal(decode(codec, payload, SPEC), sent)
        if fate == "keep":
            received += sent
        elif fate == "rollback_now":
            ef.rollback(sent)
        else:
            pending.append(sent)
    for sent in pending:
        ef.rollback(sent)
    np.testing.assert_allclose(received + ef.residual, truth, rtol=0, atol=1e-5 * bound + 1e-30)


def test_feedback_sends_what_compression_dropped_earlier() -> None:
    ef = ErrorFeedback(SPEC)
    cfg = CodecSpec.of(density=0.01, dense_below=0)
    update = np.random.default_rng(1).standard_normal(SPEC.size).astype(np.float32)
    _, first = ef.compress(update, cfg)
    _, second = ef.compress(np.zeros(SPEC.size, dtype=np.float32), cfg)
    # with a zero update the device still sends: the largest entries of what was held back
    assert np.count_nonzero(second) > 0
    # ... which are mostly entries the first round did not send (there only int8 error is left)
    assert np.count_nonzero((first != 0) & (second != 0)) < np.count_nonzero(second) / 2
    np.testing.assert_allclose(ef.residual, update - first - second, atol=1e-6)


def test_disabled_feedback_leaves_the_residual_alone() -> None:
    ef = ErrorFeedback(SPEC)
    update = np.random.default_rng(2).standard_normal(SPEC.size).astype(np.float32)
    payload, sent = ef.compress(update, CodecSpec.of(density=0.05), enabled=False)
    assert not ef.residual.any()
    np.testing.assert_array_equal(decode("topk-int8", payload, SPEC), sent)


def test_bad_input_leaves_the_residual_unchanged() -> None:
    ef = ErrorFeedback(SPEC)
    ef.compress(np.random.default_rng(3).standard_normal(SPEC.size).astype(np.float32), CodecSpec.of())
    before = ef.residual.copy()
    bad = np.zeros(SPEC.size, dtype=np.float32)
    bad[7] = np.inf
    with pytest.raises(NonFiniteError):
        ef.compress(bad, CodecSpec.of())
    with pytest.raises(NonFiniteError):
        ef.rollback(bad)
    with pytest.raises(SpecMismatchError):
        ef.compress(np.zeros(SPEC.size + 1, dtype=np.float32), CodecSpec.of())
    np.testing.assert_array_equal(ef.residual, before)


def test_residual_round_trips_through_an_atomic_npy(tmp_path) -> None:  # type: ignore[no-untyped-def]
    ef = ErrorFeedback(SPEC)
    ef.compress(np.random.default_rng(4).standard_normal(SPEC.size).astype(np.float32), CodecSpec.of())
    path = tmp_path / "state" / "residual.npy"
    ef.save(path)
    ef.save(path)  # replacing works too
    assert sorted(os.listdir(path.parent)) == ["residual.npy"]  # no temp file left behind
    loaded = ErrorFeedback.load(path, SPEC)
    np.testing.assert_array_equal(loaded.residual, ef.residual)
    assert loaded.residual.dtype == np.float32
    np.testing.assert_array_equal(np.load(path, allow_pickle=False), ef.residual)


def _object_npy_bytes() -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|O", "fortran_order": False, "shape": (1,)})
    return buf.getvalue() + b"\x80\x04not-unpickled."


def test_corrupt_residual_files_raise_state_error_naming_the_path(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cases = {
        "missing.npy": None,
        "garbage.npy": b"not an npy file at all",
        "truncated.npy": None,
        "wrong_shape.npy": np.zeros(SPEC.size + 1, dtype=np.float32),
        "wrong_dtype.npy": np.zeros(SPEC.size, dtype=np.float64),
        "nan.npy": np.full(SPEC.size, np.nan, dtype=np.float32),
        # An object array (whose body would be a pickle) is refused from its header alone.
        "pickled.npy": _object_npy_bytes(),
    }
    good = tmp_path / "good.npy"
    ErrorFeedback(SPEC).save(good)
    for name, content in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, np.ndarray):
            np.save(path, content)
        elif name == "truncated.npy":
            path.write_bytes(good.read_bytes()[:-100])
        with pytest.raises(StateError, match=name):
            ErrorFeedback.load(path, SPEC)
