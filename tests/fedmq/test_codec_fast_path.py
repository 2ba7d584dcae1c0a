"""The topk-int8 decoder's fast path (``_decode_valid``, all tensors' scales and values in one
batch) against the sequential parser (``_parse_topk``, rule by rule in the spec's order):
bit-identical on valid payloads, and never the one that decides a refusal. Every test runs
twice: with the fast path in NumPy and with the compiled kernels (fedmq.codecs.kernels,
numba; the coordinator's path), which must then be installed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmq.codecs import CodecSpec, SparseUpdate, decode_sparse, encode, kernels
from fedmq.codecs.base import as_view
from fedmq.codecs.topk_int8 import _decode_valid, _parse_topk
from fedmq.errors import CodecError
from fedmq.model.params import ParamSpec

VECTORS = Path(__file__).resolve().parents[1] / "vectors"


@pytest.fixture(scope="module", params=["numpy", "numba"], autouse=True)
def fast_path(request: pytest.FixtureRequest):
    if request.param == "numba":
        assert kernels.enable() is not None, kernels.disabled_reason
    else:
        kernels.disable()
    yield request.param
    kernels.disable()


def _spec(*sizes: int) -> ParamSpec:
    return ParamSpec(tuple(f"t{i}" for i in range(len(sizes))), tuple((n,) for n in sizes), ("float32",) * len(sizes))


def _sequential(payload: bytes, spec: ParamSpec) -> tuple[np.ndarray | None, np.ndarray]:
    parts = _parse_topk(payload, spec)
    values = np.concatenate([v for _, v in parts])
    if values.shape[0] == spec.size:
        return None, values
    return np.concatenate([np.arange(off, off + n) if idx is None else idx
                           for (idx, _), off, n in zip(parts, spec.offsets, spec.sizes)]), values


def _assert_same(payload: bytes, spec: ParamSpec) -> None:
    fast = _decode_valid(as_view(payload), spec)
    assert fast is not None
    indices, values = _sequential(payload, spec)
    assert fast.values.dtype == np.float32
    assert np.array_equal(fast.values.view(np.uint32), values.view(np.uint32))  # bit for bit
    if indices is None:
        assert fast.indices is None
    else:
        assert fast.indices is not None and fast.indices.dtype == np.int64
        assert np.array_equal(fast.indices, indices)
    # The compiled decode also sums the squares (vectorized, so in another order than NumPy's
    # pairwise sum): the L2 norm the update checks use agrees to within rounding.
    reference = float(np.square(values, dtype=np.float64).sum())
    assert (fast.sum_squares is not None) == (kernels.get() is not None)
    assert fast.l2_norm() == pytest.approx(math.sqrt(reference), rel=1e-12, abs=0)


@pytest.mark.parametrize(("sizes", "config"), [
    ((800, 32, 51200, 64, 20000, 512, 5120, 10), CodecSpec.of(density=0.01)),                 # CNN-like, global
    ((800, 32, 51200, 64, 20000, 512, 5120, 10), CodecSpec.of(density=0.01, topk="per-tensor")),
    ((3000, 40, 700), CodecSpec.of(density=0.02, block_size=16, dense_below=100)),            # partial blocks
    ((3000, 40, 700), CodecSpec.of(density=0.9, block_size=16, dense_below=100)),             # dense fallback
    ((5000,), CodecSpec.of(density=0.3, block_size=7, dense_below=0)),                         # small Rice parameter
    ((40, 5), CodecSpec.of(density=0.5, block_size=4, dense_below=0)),
    ((100000,), CodecSpec.of(density=0.0005, block_size=512, dense_below=0, stochastic=True)),  # large gaps
    ((1_000_000,), CodecSpec.of(density=5e-6, dense_below=0)),                                  # Rice parameter 17
])
def test_fast_path_is_bit_identical_to_the_sequential_parser(sizes: tuple[int, ...], config: CodecSpec) -> None:
    spec = _spec(*sizes)
    rng = np.random.default_rng(sum(sizes))
    for _ in range(3):
        x = (rng.standard_normal(spec.size) * rng.uniform(1e-4, 1e3)).astype(np.float32)
        _assert_same(encode(x, spec, config, rng=rng), spec)


def test_stored_vectors_decode_the_same_on_both_paths() -> None:
    manifest = json.loads((VECTORS / "manifest.json").read_text())
    specs = {name: ParamSpec.from_dict(d) for name, d in manifest["specs"].items()}
    checked = refused = 0
    for case in manifest["cases"]:
        if case["kind"] != "payload" or case["codec"] != "topk-int8":
            continue
        payload = (VECTORS / f"{case['name']}.bin").read_bytes()
        spec = specs[case["spec"]]
        if case["valid"]:
            _assert_same(payload, spec)
            checked += 1
        else:
            # A refused payload never gets past the fast path: the sequential parser names the rule.
            assert _decode_valid(as_view(payload), spec) is None, case["name"]
            rule = case.get("refused_by", case["rule"])
            with pytest.raises(CodecError, match=rf"\(rule {rule}\)$"):
                decode_sparse("topk-int8", payload, spec)
            refused += 1
    assert checked >= 5 and refused >= 5


def test_every_truncation_and_bit_flip_agrees_with_the_sequential_parser() -> None:
    spec = _spec(3000, 40, 700)
    payload = encode(np.random.default_rng(12).standard_normal(spec.size).astype(np.float32), spec,
                     CodecSpec.of(density=0.02, block_size=16, dense_below=100))
    variants = [payload[:cut] for cut in range(len(payload))]
    rng = np.random.default_rng(13)
    for pos in rng.integers(0, len(payload), 400):
        flipped = bytearray(payload)
        flipped[pos] ^= 1 << int(rng.integers(0, 8))
        variants.append(bytes(flipped))
    for data in variants:
        try:
            _sequential(data, spec)
        except CodecError:
            assert _decode_valid(as_view(data), spec) is None
            continue
        _assert_same(data, spec)


_configs = st.builds(lambda **params: CodecSpec.of(**params), density=st.floats(min_value=1e-4, max_value=1.0),
                     block_size=st.sampled_from([1, 3, 16, 512]), dense_below=st.sampled_from([0, 64, 4096]),
                     stochastic=st.booleans(), topk=st.sampled_from(["global", "per-tensor"]))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=30000), min_size=1, max_size=6), _configs,
       st.integers(min_value=0, max_value=2**32 - 1))
def test_random_valid_payloads_decode_bit_identically(sizes: list[int], config: CodecSpec, seed: int) -> None:
    """Every Rice parameter the encoder picks (0, the grouped reads of 1..8, the word-per-
    remainder reads above), dense and sparse records in any order, partial scale blocks."""
    spec = _spec(*sizes)
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(spec.size) * rng.uniform(1e-4, 1e3)).astype(np.float32)
    _assert_same(encode(x, spec, config, rng=rng), spec)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=5000), min_size=1, max_size=4), _configs, st.data())
def test_random_damaged_payloads_are_left_to_the_sequential_parser(sizes: list[int], config: CodecSpec,
                                                                   data: st.DataObject) -> None:
    spec = _spec(*sizes)
    rng = np.random.default_rng(data.draw(st.integers(min_value=0, max_value=2**32 - 1)))
    raw = bytearray(encode(rng.standard_normal(spec.size).astype(np.float32), spec, config, rng=rng))
    for _ in range(data.draw(st.integers(1, 3))):
        op = data.draw(st.sampled_from(["flip", "byte", "cut", "append", "insert"]))
        at = data.draw(st.integers(0, len(raw) - 1)) if raw else 0
        if op == "flip" and raw:
            raw[at] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "byte" and raw:
            raw[at] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del raw[at:]
        elif op == "append":
            raw += data.draw(st.binary(min_size=1, max_size=8))
        else:
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=8))
    payload = bytes(raw)
    try:
        _sequential(payload, spec)
    except CodecError:
        assert _decode_valid(as_view(payload), spec) is None
        return
    _assert_same(payload, spec)


def test_a_last_remainder_stream_near_the_end_of_the_payload() -> None:
    """One position kept and one scale after the last remainder stream: 5 bytes follow it,
    fewer than the 7 a 64-bit read past it needs, so the fast path reads from a padded copy."""
    spec = _spec(100000)
    payload = encode(np.random.default_rng(3).standard_normal(spec.size).astype(np.float32), spec,
                     CodecSpec.of(density=1e-5, dense_below=0))
    assert payload[9] == 1 and int.from_bytes(payload[10:14], "little") == 1  # sparse, k = 1
    _assert_same(payload, spec)


def test_add_into_gives_the_same_sums_on_both_paths() -> None:
    """``out[indices] += weight * values`` in float64 and float32 accumulators, bit for bit
    whichever path runs it; an index outside the accumulator raises and writes nothing."""
    rng = np.random.default_rng(5)
    size = 50000
    for dtype in (np.float64, np.float32):
        out = [rng.standard_normal(size).astype(dtype)]
        out.append(out[0].copy())
        for _ in range(5):
            upd = SparseUpdate(np.sort(rng.choice(size, 700, replace=False)).astype(np.int64),
                               (rng.standard_normal(700) * 3).astype(np.float32), size)
            weight = float(rng.uniform(0.01, 50))
            upd.add_into(out[0], weight)
            np.add.at(out[1], upd.indices, np.multiply(upd.values, weight, dtype=dtype))
        assert np.array_equal(out[0], out[1])
    bad = SparseUpdate(np.array([3, size], dtype=np.int64), np.ones(2, dtype=np.float32), size)
    before = out[0].copy()
    with pytest.raises(IndexError):
        bad.add_into(out[0], 1.0)
    assert np.array_equal(out[0], before)
