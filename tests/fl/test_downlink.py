"""Downlink compression with server-side error feedback, the delta blob, the chain and the catch-up rule."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmq.fl.chain import ChainEntry, DeltaBlob, ModelChain
from fedmq.codecs import CodecSpec
from fedmq.errors import CodecError, SpecMismatchError, WireError
from fedmq.fl import downlink
from fedmq.fl.downlink import apply_delta, compress_step, params_sha256, choose_catch_up, server_model
from fedmq.fl.server_opt import make_server_optimizer
from fedmq.model.params import ParamSpec

SPEC = ParamSpec(("w", "b"), ((40, 50), (50,)), ("float32", "float32"))
CFG = CodecSpec.of(density=0.02, dense_below=64)


def test_published_model_is_exactly_the_previous_one_plus_the_decoded_delta():
    rng = np.random.default_rng(0)
    p = rng.normal(size=SPEC.size).astype(np.float32)
    x = p + (0.01 * rng.normal(size=SPEC.size)).astype(np.float32)
    step = compress_step(p, x, SPEC, CFG)
    again = apply_delta(p, CFG.name, step.payload, SPEC)
    assert params_sha256(again) == params_sha256(step.published)
    np.testing.assert_array_equal(step.residual, x - step.published)
    # Top-K at 2% of the weight tensor plus the dense bias: most entries stay behind.
    moved = np.count_nonzero(step.published != p)
    assert 0 < moved <= int(0.02 * 2000 + 0.5) + 50


def test_params_sha256_is_the_hash_of_little_endian_float32_bytes():
    v = np.array([1.0, -0.0, 2.5], dtype=np.float32)
    assert params_sha256(v) == hashlib.sha256(b"\x00\x00\x80?\x00\x00\x00\x80\x00\x00 @").hexdigest()
    with pytest.raises(SpecMismatchError):
        params_sha256(v.astype(np.float64))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rounds=st.integers(1, 12), density=st.sampled_from([0.005, 0.02, 0.3]),
       optimizer=st.sampled_from(["fedavg", "fedavgm", "fedadam"]))
def test_residual_invariant_sum_of_published_deltas_plus_residual_is_the_sum_of_optimizer_steps(
        seed, rounds, density, optimizer):
    rng = np.random.default_rng(seed)
    opt = make_server_optimizer(optimizer)
    cfg = CodecSpec.of(density=density, dense_below=64)
    p = rng.normal(size=SPEC.size).astype(np.float32)
    r = np.zeros(SPEC.size, dtype=np.float32)
    steps = np.zeros(SPEC.size, dtype=np.float64)
    sent = np.zeros(SPEC.size, dtype=np.float64)
    for _ in range(rounds):
        x = server_model(p, r)
        before = x.copy()
        opt.step(x, (0.05 * rng.normal(size=SPEC.size)).astype(np.float32))
        steps += x.astype(np.float64) - before
        step = compress_step(p, x, SPEC, cfg)
        sent += step.published.astype(np.float64) - p
        p, r = step.published, step.residual
    scale = max(1.0, float(np.abs(steps).max()))
    np.testing.assert_allclose(sent + r, steps, rtol=0, atol=1e-5 * scale * rounds)


def test_delta_blob_round_trips_and_rejects_tampering():
    rng = np.random.default_rng(1)
    p = rng.normal(size=SPEC.size).astype(np.float32)
    step = compress_step(p, p + 0.1, SPEC, CFG)
    blob = DeltaBlob(CFG.name, SPEC.hash, 6, 7, params_sha256(p), params_sha256(step.published), step.payload)
    data = blob.to_bytes()
    assert data[:4] == b"FMQD" and DeltaBlob.from_bytes(data) == blob
    for bad, what in ((data[:-1], "payload of"), (b"XXXX" + data[4:], "magic"), (data[:4] + b"\x02" + data[5:], "layout"),
                      (data + b"\x00", "payload of")):
        with pytest.raises(WireError, match=what):
            DeltaBlob.from_bytes(bad)
    with pytest.raises(WireError, match="V-1 -> V"):
        DeltaBlob(CFG.name, SPEC.hash, 6, 8, params_sha256(p), params_sha256(p), b"").to_bytes()
    # A corrupted payload fails in the codec, never with anything but a CodecError.
    torn = bytearray(blob.payload)
    torn[0] = 99
    with pytest.raises(CodecError):
        apply_delta(p, CFG.name, bytes(torn), SPEC)


def _entry(v: int, size: int) -> ChainEntry:
    return ChainEntry(v, size, "a" * 64, "b" * 64)


def test_chain_message_round_trips_and_is_strict():
    chain = ModelChain(SPEC.hash, "topk-int8", 3, "c" * 64, 9, "d" * 64, _entry(8, 1000),
                       (_entry(8, 10), _entry(9, 11)))
    assert ModelChain.from_bytes(chain.to_bytes()) == chain
    assert chain.sha256_of(9) == "d" * 64 and chain.sha256_of(0) == "c" * 64 and chain.sha256_of(3) is None
    bad = ModelChain(SPEC.hash, "topk-int8", 3, "c" * 64, 9, "d" * 64, _entry(8, 1000), (_entry(9, 1), _entry(8, 1)))
    with pytest.raises(WireError, match="ascend"):
        ModelChain.from_bytes(bad.to_bytes())


def test_catch_up_takes_deltas_when_cheaper_else_the_snapshot():
    sizes = {v: 100 for v in range(5, 13)}
    # Holding 9, needing 12: three deltas (300 bytes) against snapshot 10 + two deltas.
    plan = choose_catch_up(9, 12, sizes, 10, 1000)
    assert plan.snapshot is None and plan.deltas == (10, 11, 12) and plan.cost == 300
    # Deltas more expensive than the snapshot path.
    plan = choose_catch_up(5, 12, sizes, 10, 400)
    assert plan.snapshot == 10 and plan.deltas == (11, 12) and plan.cost == 600
    # A gap (version 4 left the window) forces the snapshot, and so does a failed delta path.
    assert choose_catch_up(3, 12, sizes, 10, 10**6).snapshot == 10
    assert "not retained" in choose_catch_up(3, 12, sizes, 10, 10**6).reason
    assert choose_catch_up(9, 12, sizes, 10, 10**6, avoid_deltas=True).snapshot == 10
    # Nothing held: snapshot; snapshot newer than the target and no deltas: unreachable.
    assert choose_catch_up(None, 12, sizes, 10, 50).deltas == (11, 12)
    assert choose_catch_up(None, 9, sizes, 10, 50) is None
    assert choose_catch_up(12, 12, sizes, 10, 50) == downlink.CatchUp(None, (), 0, "0 delta(s) from version 12")
