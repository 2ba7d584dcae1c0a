"""Codecs topk-int8 and none: round trips, Top-K and int8 properties, sizes, strict decoding.

Malformed payloads are built by hand with a plain-Python writer that follows
docs/wire-format.md, independently of the vectorised encoder.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedmq.codecs import CodecSpec, SparseUpdate, decode, decode_sparse, encode, max_payload_bytes
from fedmq.errors import CodecError, NonFiniteError, SpecMismatchError, WireError
from fedmq.wire.messages import TrainPlan
from fedmq.model.params import ParamSpec

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _spec(*sizes: int) -> ParamSpec:
    return ParamSpec(tuple(f"t{i}" for i in range(len(sizes))), tuple((n,) for n in sizes), ("float32",) * len(sizes))


# ---------------------------------------------------------------- reference writer (plain Python)

def _bits_to_bytes(bits: list[int]) -> bytes:
    bits = bits + [0] * (-len(bits) % 8)
    return bytes(int("".join(map(str, bits[i:i + 8])), 2) for i in range(0, len(bits), 8))


def _rice(indices: list[int], b: int) -> tuple[bytes, bytes]:
    unary: list[int] = []
    rem: list[int] = []
    prev = -1
    for i in indices:
        gap = i - prev - 1
        prev = i
        unary += [0] * (gap >> b) + [1]
        rem += [(gap >> (b - 1 - j)) & 1 for j in range(b)]
    return _bits_to_bytes(unary), _bits_to_bytes(rem)


def _header(block: int, ntensors: int, fmt: int = 1) -> bytes:
    return struct.pack("<BII", fmt, block, ntensors)


def _dense(scales: list[float], q: list[int]) -> bytes:
    return b"\x00" + struct.pack(f"<{len(scales)}f", *scales) + struct.pack(f"<{len(q)}b", *q)


def _sparse(indices: list[int], b: int, scales: list[float], q: list[int], *, k: int | None = None,
            unary: bytes | None = None, rem: bytes | None = None) -> bytes:
    u, r = _rice(indices, b)
    u = u if unary is None else unary
    r = r if rem is None else rem
    k = len(indices) if k is None else k
    return (b"\x01" + struct.pack("<IBI", k, b, len(u)) + u + r + struct.pack(f"<{len(scales)}f", *scales)
            + struct.pack(f"<{len(q)}b", *q))


# ---------------------------------------------------------------- round trips and properties

@st.composite
def _cases(draw):  # type: ignore[no-untyped-def]
    sizes = draw(st.lists(st.integers(1, 3000), min_size=1, max_size=5))
    spec = _spec(*sizes)
    seed = draw(st.integers(0, 2**32 - 1))
    scale = draw(st.sampled_from([1e-6, 1.0, 1e4]))
    x = (np.random.default_rng(seed).standard_normal(spec.size) * scale).astype(np.float32)
    if draw(st.booleans()):
        x[np.random.default_rng(seed + 1).random(spec.size) < 0.5] = 0.0
    cfg = CodecSpec.of(density=draw(st.sampled_from([0.001, 0.01, 0.1, 0.5, 1.0])),
                      block_size=draw(st.sampled_from([1, 7, 64, 512])),
                      dense_below=draw(st.sampled_from([0, 100, 1024])),
                      topk=draw(st.sampled_from(["global", "per-tensor"])))
    return spec, x, cfg


@FAST
@given(_cases())
def test_topk_round_trip_properties(case) -> None:  # type: ignore[no-untyped-def]
    spec, x, cfg = case
    payload = encode(x, spec, cfg)
    assert len(payload) <= max_payload_bytes("topk-int8", spec)
    y = decode("topk-int8", payload, spec)
    assert y.dtype == np.float32 and y.shape == (spec.size,)
    su = decode_sparse("topk-int8", payload, spec)
    np.testing.assert_array_equal(su.to_dense(spec.size), y)
    if su.indices is not None:
        assert np.all(np.diff(su.indices) > 0) and su.indices[0] >= 0 and su.indices[-1] < spec.size
    idx = np.arange(spec.size) if su.indices is None else su.indices
    sent = np.zeros(spec.size, dtype=bool)
    sent[idx] = True
    candidates = [(off, n) for off, n in zip(spec.offsets, spec.sizes) if n >= cfg.params.dense_below and cfg.params.kept(n) < n]
    for off, n in zip(spec.offsets, spec.sizes):
        xt, yt = x[off:off + n], y[off:off + n]
        local = idx[(idx >= off) & (idx < off + n)] - off
        k = cfg.params.kept(n)
        assert local.shape[0] >= 1  # at least one entry per tensor
        if (off, n) not in candidates:
            assert local.shape[0] == n
        elif cfg.params.topk == "per-tensor":
            assert local.shape[0] in (k, n)  # Top-K, or the dense fallback
        # every value sent is within half an int8 step of the truth (step bound by the tensor's max)
        amax = float(np.abs(xt).max())
        err = np.abs(yt - xt)[local]
        assert np.all(err <= 0.5 * amax / 127.0 + 1e-6 * amax)
        if local.shape[0] < n:
            # Top-K by magnitude: whatever was sent is at least as large as whatever was not
            rest = np.ones(n, dtype=bool)
            rest[local] = False
            assert np.abs(xt[local]).min() >= np.abs(xt[rest]).max()
            assert not yt[rest].any()
    if cfg.params.topk == "global" and candidates:
        # one budget across the candidates: every entry above the budget-th largest magnitude
        # is sent, and the sparse records together keep at most budget + one per tensor
        mags = np.concatenate([np.abs(x[off:off + n]) for off, n in candidates])
        was_sent = np.concatenate([sent[off:off + n] for off, n in candidates])
        budget = sum(cfg.params.kept(n) for _, n in candidates)
        if budget < mags.shape[0]:
            tau = np.sort(mags)[::-1][budget - 1]
            assert was_sent[mags > tau].all()
        sparse_kept = [int(sent[off:off + n].sum()) for off, n in candidates if sent[off:off + n].sum() < n]
        assert sum(sparse_kept) <= budget + len(candidates) - 1


def test_top_k_keeps_exactly_the_largest_entries_per_tensor() -> None:
    spec = _spec(5000, 2000, 50)
    rng = np.random.default_rng(3)
    x = rng.standard_normal(spec.size).astype(np.float32)
    cfg = CodecSpec.of(density=0.01, dense_below=100, topk="per-tensor")
    su = decode_sparse("topk-int8", encode(x, spec, cfg), spec)
    idx = su.indices
    assert idx is not None
    for off, n in zip(spec.offsets, spec.sizes):
        local = idx[(idx >= off) & (idx < off + n)] - off
        if n < 100:
            np.testing.assert_array_equal(local, np.arange(n))  # small tensors go dense
        else:
            expect = np.sort(np.argsort(-np.abs(x[off:off + n]))[:cfg.params.kept(n)])
            np.testing.assert_array_equal(local, expect)


def test_global_top_k_spends_the_budget_where_the_update_is_largest() -> None:
    # Tensor 1 (an "output layer", 2,000 entries) moves ten times more than tensor 0: under
    # global selection it gets the whole 70-entry budget that per-tensor selection splits
    # 50 / 20, tensor 0 keeps its largest entry, and tensor 2 (below dense_below) goes dense.
    spec = _spec(5000, 2000, 50)
    rng = np.random.default_rng(3)
    x = rng.standard_normal(spec.size).astype(np.float32)
    x[5000:7000] *= 10.0
    counts = {}
    for mode in ("per-tensor", "global"):
        su = decode_sparse("topk-int8", encode(x, spec, CodecSpec.of(density=0.01, dense_below=100, topk=mode)), spec)
        assert su.indices is not None
        counts[mode] = [int(((su.indices >= off) & (su.indices < off + n)).sum())
                        for off, n in zip(spec.offsets, spec.sizes)]
    assert counts["per-tensor"] == [50, 20, 50]
    assert counts["global"] == [1, 70, 50]
    expect = [int(np.argmax(np.abs(x[:5000])))] + sorted(5000 + np.argsort(-np.abs(x[5000:7000]))[:70])
    np.testing.assert_array_equal(su.indices[su.indices < 7000], expect)


def test_global_top_k_keeps_one_entry_of_a_tensor_the_budget_missed() -> None:
    spec = _spec(3000, 3000)
    x = np.full(spec.size, 1e-3, dtype=np.float32)
    x[:3000] = np.linspace(1.0, 2.0, 3000, dtype=np.float32)
    x[4321] = 5e-3
    su = decode_sparse("topk-int8", encode(x, spec, CodecSpec.of(density=0.01, dense_below=0)), spec)
    assert su.indices is not None
    assert list(su.indices[su.indices >= 3000]) == [4321]  # its largest, though below the budget
    assert int((su.indices < 3000).sum()) == 60


def test_unknown_topk_mode_is_refused() -> None:
    with pytest.raises(CodecError, match="topk"):
        CodecSpec.of(topk="layer")


@pytest.mark.parametrize("layout", ["normal", "mostly_zero", "spikes_on_stride", "spikes_off_stride", "ties"])
def test_top_k_on_large_tensors_is_exact(layout: str) -> None:
    # Large tensors select from a sampled threshold: whatever the layout, the kept set must
    # have exactly the magnitudes of a full sort.
    n = 300_000
    rng = np.random.default_rng(14)
    x = rng.standard_normal(n).astype(np.float32)
    if layout == "mostly_zero":
        x[rng.random(n) < 0.998] = 0.0
    elif layout == "spikes_on_stride":
        x = (x * 1e-3).astype(np.float32)
        x[::n // 65536] = 5.0 + rng.random(len(x[::n // 65536]))
    elif layout == "spikes_off_stride":
        x = (x * 1e-3).astype(np.float32)
        x[1::n // 65536] = 5.0 + rng.random(len(x[1::n // 65536]))
    elif layout == "ties":
        x = rng.integers(-3, 4, n).astype(np.float32)
    spec = _spec(n)
    cfg = CodecSpec.of(density=0.01)
    su = decode_sparse("topk-int8", encode(x, spec, cfg), spec)
    k = cfg.params.kept(n)
    assert su.indices is not None and su.indices.shape[0] == k
    np.testing.assert_array_equal(np.sort(np.abs(x[su.indices])), np.sort(np.abs(x))[n - k:])


def test_quantization_error_is_small() -> None:
    spec = _spec(200_000)
    x = np.random.default_rng(4).standard_normal(spec.size).astype(np.float32)
    cfg = CodecSpec.of(density=1.0)
    y = decode("topk-int8", encode(x, spec, cfg), spec)
    rel = np.linalg.norm(y - x) / np.linalg.norm(x)
    assert rel < 0.02


def test_stochastic_rounding_is_unbiased() -> None:
    spec = _spec(64)
    x = np.linspace(-1, 1, 64, dtype=np.float32) * 0.9
    x[0] = 1.0  # pins the scale to 1/127
    cfg = CodecSpec.of(density=1.0, stochastic=True)
    rng = np.random.default_rng(5)
    mean = np.mean([decode("topk-int8", encode(x, spec, cfg, rng), spec) for _ in range(400)], axis=0)
    step = 1 / 127
    assert np.max(np.abs(mean - x)) < 0.15 * step
    nearest = decode("topk-int8", encode(x, spec, CodecSpec.of(density=1.0)), spec)
    assert np.max(np.abs(nearest - x)) <= 0.5 * step * 1.0001


def test_none_codec_is_exact() -> None:
    spec = _spec(10, 3)
    x = np.random.default_rng(6).standard_normal(spec.size).astype(np.float32)
    payload = encode(x, spec, CodecSpec.of(name="none"))
    assert len(payload) == 4 * spec.size
    np.testing.assert_array_equal(decode("none", payload, spec), x)
    su = decode_sparse("none", payload, spec)
    assert su.indices is None
    out = np.ones(spec.size)
    su.add_into(out, 0.5)
    np.testing.assert_allclose(out, 1 + 0.5 * x.astype(np.float64), rtol=1e-6)


def test_sparse_update_add_into_l2_norm_and_shape_checks() -> None:
    spec = _spec(3000, 10)
    x = np.random.default_rng(7).standard_normal(spec.size).astype(np.float32)
    payload = encode(x, spec, CodecSpec.of(density=0.05, dense_below=1024))
    dense = decode("topk-int8", payload, spec)
    su = decode_sparse("topk-int8", payload, spec)
    acc = np.zeros(spec.size, dtype=np.float64)
    su.add_into(acc, 2.0)
    su.add_into(acc, 0.5)
    np.testing.assert_allclose(acc, 2.5 * dense.astype(np.float64), rtol=1e-6)
    assert su.l2_norm() == pytest.approx(float(np.linalg.norm(dense.astype(np.float64))), rel=1e-9)
    assert su.nnz == 150 + 10
    with pytest.raises(SpecMismatchError):
        su.add_into(np.zeros(spec.size - 1), 1.0)
    with pytest.raises(SpecMismatchError):
        su.to_dense(spec.size + 1)
    full = decode_sparse("topk-int8", encode(x, spec, CodecSpec.of(density=1.0)), spec)
    assert full.indices is None and full.nnz == spec.size
    assert isinstance(full, SparseUpdate)


# ---------------------------------------------------------------- sizes

def test_index_cost_at_one_percent_on_a_million_entries() -> None:
    spec = _spec(1_000_000)
    x = np.random.default_rng(8).standard_normal(spec.size).astype(np.float32)
    cfg = CodecSpec.of(density=0.01)
    payload = encode(x, spec, cfg)
    k = cfg.params.kept(spec.size)
    assert payload[9] == 1  # sparse record
    index_bytes = len(payload) - 9 - 1 - 9 - 4 * math.ceil(k / cfg.params.block_size) - k
    assert index_bytes * 8 / k <= 10.5


@pytest.mark.parametrize(("density", "min_ratio"), [(0.01, 150), (0.001, 1000)])
def test_compression_ratio_on_a_cnn_sized_update(density: float, min_ratio: float) -> None:
    # the parameter tensors of McMahan et al.'s MNIST CNN (1,663,370 entries)
    spec = _spec(800, 32, 51200, 64, 1605632, 512, 5120, 10)
    x = np.random.default_rng(9).standard_normal(spec.size).astype(np.float32)
    payload = encode(x, spec, CodecSpec.of(density=density))
    assert 4 * spec.size / len(payload) >= min_ratio


def test_each_tensor_falls_back_to_the_cheaper_record() -> None:
    spec = _spec(4096, 4096)
    x = np.random.default_rng(10).standard_normal(spec.size).astype(np.float32)
    dense_record = 1 + 4 * 8 + 4096
    p = encode(x, spec, CodecSpec.of(density=0.9))  # sparse would cost more than dense
    assert len(p) == 9 + 2 * dense_record and p[9] == 0 and p[9 + dense_record] == 0
    p = encode(x, spec, CodecSpec.of(density=0.05))
    assert len(p) < 9 + 2 * dense_record and p[9] == 1


def test_plan_and_downlink_default_to_the_codec_s_own_defaults() -> None:
    from fedmq.codecs.topk_int8 import DENSE_BELOW, TopKParams
    assert TrainPlan().codec == CodecSpec() == CodecSpec.of("topk-int8")
    assert CodecSpec().params == TopKParams() and TopKParams().dense_below == DENSE_BELOW == 4096


def test_dense_below_sends_small_tensors_whole() -> None:
    spec = _spec(500, 2000)
    x = np.random.default_rng(11).standard_normal(spec.size).astype(np.float32)
    su = decode_sparse("topk-int8", encode(x, spec, CodecSpec.of(density=0.01, dense_below=1000)), spec)
    assert su.indices is not None
    np.testing.assert_array_equal(su.indices[:500], np.arange(500))
    assert su.indices.shape[0] == 500 + 20


# ---------------------------------------------------------------- configuration and encoder input

def test_codec_spec_validation() -> None:
    plan = TrainPlan.from_table({"codec": "none", "density": 0.2, "block_size": 64, "dense_below": 7,
                                 "stochastic": True})
    assert plan.codec == CodecSpec("none")  # another codec's parameters are left
    for kwargs in ({"name": "gzip"}, {"density": 0.0}, {"density": 1.5}, {"block_size": 0},
                   {"block_size": 2**32}, {"dense_below": -1}, {"density": "0.1"}, {"block_size": 1.0},
                   {"stochastic": 1}, {"dense_below": True}, {"topk": "layer"}, {"density": float("nan")},
                   {"k": 3}):
        with pytest.raises(CodecError):
            CodecSpec.of(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(CodecError, match="has no parameter"):
        CodecSpec.of("none", density=0.1)
    assert CodecSpec.of(density=1).params.density == 1.0  # an int is taken for a float
    assert CodecSpec.of(density=0.01).params.kept(10) == 1 and CodecSpec.of(density=0.01).params.kept(1000) == 10


def test_encoder_refuses_non_finite_and_wrong_shape() -> None:
    spec = _spec(100)
    x = np.zeros(100, dtype=np.float32)
    x[3] = np.nan
    for name in ("topk-int8", "none"):
        with pytest.raises(NonFiniteError):
            encode(x, spec, CodecSpec.of(name=name))
        with pytest.raises(SpecMismatchError):
            encode(np.zeros(99, dtype=np.float32), spec, CodecSpec.of(name=name))


# ---------------------------------------------------------------- strict decoding

def test_reference_writer_agrees_with_the_decoder() -> None:
    spec = _spec(10, 3)
    payload = (_header(2, 2) + _sparse([0, 4, 9], 1, [0.5, 1.0], [1, -2, 3])
               + _dense([0.25, 2.0], [4, -127, 1]))
    expect = np.zeros(13, dtype=np.float32)
    expect[[0, 4, 9]] = [0.5, -1.0, 3.0]
    expect[10:] = [1.0, -31.75, 2.0]
    np.testing.assert_array_equal(decode("topk-int8", payload, spec), expect)


_SPEC = _spec(10, 3)
_OK_TAIL = _dense([1.0], [1, 2, 3])


@pytest.mark.parametrize(("payload", "exc", "match"), [
    (b"", CodecError, "truncated"),
    (_header(512, 2, fmt=2) + _sparse([1], 0, [1.0], [1]) + _OK_TAIL, CodecError, "layout version"),
    (_header(0, 2) + _sparse([1], 0, [1.0], [1]) + _OK_TAIL, CodecError, "block size"),
    (_header(512, 3) + _sparse([1], 0, [1.0], [1]) + _OK_TAIL, CodecError, "tensors"),
    (_header(512, 2) + b"\x02" + _OK_TAIL, CodecError, "mode"),
    (_header(512, 2) + _sparse([1], 0, [1.0], [1]) + _OK_TAIL + b"\x00", CodecError, "trailing"),
    (_header(512, 2) + _sparse([10], 0, [1.0], [1]) + _OK_TAIL, CodecError, "out of range"),
    (_header(512, 2) + _sparse([2, 9, 12], 1, [1.0], [1, 1, 1]) + _OK_TAIL, CodecError, "out of range"),
    (_header(512, 2) + _sparse([1, 2], 0, [1.0], [1, 1], k=11) + _OK_TAIL, CodecError, "kept values"),
    (_header(512, 2) + _sparse([1, 2], 0, [1.0], [1, 1], k=0) + _OK_TAIL, CodecError, "kept values"),
    (_header(512, 2) + _sparse([1, 2], 4, [1.0], [1, 1]) + _OK_TAIL, CodecError, "Rice parameter"),
    (_header(512, 2) + _sparse([1, 2], 0, [1.0], [1, 1], k=1) + _OK_TAIL, CodecError, "codes"),
    (_header(512, 2) + _sparse([1], 0, [1.0], [1], unary=b"\x40\x00") + _OK_TAIL, CodecError, "unary"),
    (_header(512, 2) + _sparse([1], 0, [1.0], [1], unary=b"\x00" * 5 + b"\x01") + _OK_TAIL, CodecError, "unary"),
    (_header(512, 2) + _sparse([1, 3], 1, [1.0], [1, 1], rem=b"\x7f") + _OK_TAIL, CodecError, "padding"),
    (_header(512, 2) + _sparse([1], 0, [float("nan")], [1]) + _OK_TAIL, NonFiniteError, "NaN"),
    (_header(512, 2) + _sparse([1], 0, [float("inf")], [1]) + _OK_TAIL, NonFiniteError, "Inf"),
    (_header(512, 2) + _sparse([1], 0, [-1.0], [1]) + _OK_TAIL, CodecError, "negative"),
    (_header(512, 2) + _sparse([1], 0, [3e38], [1]) + _OK_TAIL, NonFiniteError, "would be Inf"),
    (_header(512, 2) + _sparse([1], 0, [1.0], [-128]) + _OK_TAIL, CodecError, "-128"),
    (_header(512, 2) + _sparse([1], 0, [1.0], [1]) + _dense([float("nan")], [1, 2, 3]), NonFiniteError, "NaN"),
    (_header(512, 2) + _sparse([1], 0, [1.0], [1]) + _dense([1.0], [1, 2]), CodecError, "truncated"),
    (b"\x00" * (max_payload_bytes("topk-int8", _SPEC) + 1), CodecError, "exceeds"),
])
def test_malformed_topk_payloads(payload: bytes, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        decode_sparse("topk-int8", payload, _SPEC)
    with pytest.raises(exc, match=match):
        decode("topk-int8", payload, _SPEC)


def test_huge_declared_sizes_are_refused_before_allocating() -> None:
    spec = _spec(1000)
    # k and the unary length at their u32 maximum: refused from the header alone
    bad_k = _header(512, 1) + b"\x01" + struct.pack("<IBI", 2**32 - 1, 0, 1) + b"\x80"
    bad_u = _header(512, 1) + b"\x01" + struct.pack("<IBI", 1, 0, 2**32 - 1) + b"\x80"
    for payload in (bad_k, bad_u):
        with pytest.raises(CodecError):
            decode_sparse("topk-int8", payload, spec)


def test_every_truncation_and_bit_flip_is_refused_or_valid() -> None:
    spec = _spec(3000, 40, 700)
    x = np.random.default_rng(12).standard_normal(spec.size).astype(np.float32)
    payload = encode(x, spec, CodecSpec.of(density=0.02, block_size=16, dense_below=100))
    for cut in range(len(payload)):
        with pytest.raises(CodecError):
            decode_sparse("topk-int8", payload[:cut], spec)
    rng = np.random.default_rng(13)
    for pos in rng.integers(0, len(payload), 300):
        flipped = bytearray(payload)
        flipped[pos] ^= 1 << int(rng.integers(0, 8))
        try:
            su = decode_sparse("topk-int8", bytes(flipped), spec)
        except CodecError:
            continue
        assert su.values.shape[0] <= spec.size and np.isfinite(su.values).all()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.sampled_from(["topk-int8", "none", "zstd"]))
def test_any_bytes_decode_or_raise_codec_error(data: bytes, codec: str) -> None:
    spec = _spec(17, 3)
    try:
        y = decode(codec, data, spec)
    except CodecError:
        return
    assert y.shape == (20,) and np.isfinite(y).all()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=60))
def test_any_records_after_a_valid_header_decode_or_raise(tail: bytes) -> None:
    spec = _spec(40, 5)
    try:
        su = decode_sparse("topk-int8", _header(4, 2) + tail, spec)
    except CodecError:
        return
    assert np.isfinite(su.values).all()


def test_none_codec_strictness() -> None:
    spec = _spec(4)
    with pytest.raises(CodecError, match="expected 16"):
        decode("none", b"\x00" * 15, spec)
    with pytest.raises(NonFiniteError):
        decode_sparse("none", struct.pack("<4f", 1, 2, float("inf"), 4), spec)
    with pytest.raises(CodecError, match="bytes"):
        decode("none", "text", spec)  # type: ignore[arg-type]
    with pytest.raises(CodecError, match="unknown codec"):
        decode_sparse("lz4", b"", spec)
    assert issubclass(CodecError, WireError)


# ---------------------------------------------------------------- the spec's exact arithmetic

@pytest.mark.security
def test_scale_limit_is_the_largest_float32_whose_int8_multiples_are_finite() -> None:
    limit = np.frombuffer(struct.pack("<I", 0x7C010203), dtype="<f4")[0]
    above = np.frombuffer(struct.pack("<I", 0x7C010204), dtype="<f4")[0]
    with np.errstate(over="ignore"):
        assert np.isfinite(np.float32(127) * limit) and np.isinf(np.float32(127) * above)
    spec = _spec(10, 3)
    ok = _header(512, 2) + _sparse([1], 0, [float(limit)], [-127]) + _OK_TAIL
    assert np.isfinite(decode("topk-int8", ok, spec)).all()
    for dense in (False, True):  # both record modes
        bad = (_header(512, 2) + _sparse([1], 0, [float(above)], [127]) + _OK_TAIL if not dense else
               _header(512, 2) + _sparse([1], 0, [1.0], [1]) + _dense([float(above)], [1, 2, 3]))
        with pytest.raises(NonFiniteError, match=r"0x7c010203.*\(rule R40\)$"):
            decode("topk-int8", bad, spec)


def test_stochastic_rounding_draws_follow_the_spec() -> None:
    # docs/wire-format.md: u = (w >> 8) * 2**-24 for consecutive 32-bit words w, the low half
    # of each PCG64 output first; x = v * float32(1 / scale); q = clip(floor(x + u), -127, 127).
    spec = _spec(3000, 40, 700)
    x = np.random.default_rng(21).standard_normal(spec.size).astype(np.float32)
    cfg = CodecSpec.of(density=0.02, block_size=16, dense_below=100, stochastic=True)
    payload = encode(x, spec, cfg, np.random.default_rng(99))
    su = decode_sparse("topk-int8", payload, spec)
    assert su.indices is not None
    raw = np.random.default_rng(99).bit_generator.random_raw(su.nnz)  # more than enough words
    words = np.stack([raw & 0xFFFFFFFF, raw >> 32], axis=1).reshape(-1).astype(np.uint64)
    u = ((words >> np.uint64(8)).astype(np.float32) * np.float32(2.0**-24))
    used = 0
    expect = []
    for off, n in zip(spec.offsets, spec.sizes):
        kept = su.indices[(su.indices >= off) & (su.indices < off + n)]
        v = x[kept]
        for start in range(0, v.shape[0], cfg.params.block_size):
            block = v[start:start + cfg.params.block_size]
            scale = np.float32(np.abs(block).max()) / np.float32(127)
            inv = np.float32(1) / scale if scale > 0 else np.float32(0)
            xs = (block * inv).astype(np.float32)
            q = np.clip(np.floor(xs + u[used + start:used + start + block.shape[0]]), -127, 127)
            expect.append(q.astype(np.float32) * scale)
        used += v.shape[0]
    np.testing.assert_array_equal(su.values, np.concatenate(expect).astype(np.float32))
