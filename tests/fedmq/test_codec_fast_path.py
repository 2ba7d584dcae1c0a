"""The topk-int8 decoder's fast path (``_decode_valid``, all tensors' scales and values in one
batch) against the sequential parser (``_parse_topk``, rule by rule in the spec's order):
bit-identical on valid payloads, and never the one that decides a refusal."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedmq.codecs import CodecSpec, decode_sparse, encode
from fedmq.codecs.base import as_view
from fedmq.codecs.topk_int8 import _decode_valid, _parse_topk
from fedmq.errors import CodecError
from fedmq.model.params import ParamSpec

VECTORS = Path(__file__).resolve().parents[1] / "vectors"


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


@pytest.mark.parametrize(("sizes", "config"), [
    ((800, 32, 51200, 64, 20000, 512, 5120, 10), CodecSpec.of(density=0.01)),                 # CNN-like, global
    ((800, 32, 51200, 64, 20000, 512, 5120, 10), CodecSpec.of(density=0.01, topk="per-tensor")),
    ((3000, 40, 700), CodecSpec.of(density=0.02, block_size=16, dense_below=100)),            # partial blocks
    ((3000, 40, 700), CodecSpec.of(density=0.9, block_size=16, dense_below=100)),             # dense fallback
    ((5000,), CodecSpec.of(density=0.3, block_size=7, dense_below=0)),                         # small Rice parameter
    ((40, 5), CodecSpec.of(density=0.5, block_size=4, dense_below=0)),
    ((100000,), CodecSpec.of(density=0.0005, block_size=512, dense_below=0, stochastic=True)),  # large gaps
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
