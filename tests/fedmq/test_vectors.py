"""The stored wire-format test vectors (tests/vectors/, docs/wire-format.md) against the decoders."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedmq import PROTOCOL_VERSION, errors
from fedmq.codecs import CodecConfig, decode, decode_sparse, encode
from fedmq.envelope import decode_update, encode_update
from fedmq.params import ParamSpec

VECTORS = Path(__file__).resolve().parents[1] / "vectors"
MANIFEST = json.loads((VECTORS / "manifest.json").read_text())
SPECS = {name: ParamSpec.from_dict(d) for name, d in MANIFEST["specs"].items()}
CASES = {c["name"]: c for c in MANIFEST["cases"]}


def _npy(name: str) -> np.ndarray:
    return np.load(io.BytesIO((VECTORS / name).read_bytes()), allow_pickle=False)


def test_manifest_covers_every_kind_of_case() -> None:
    assert MANIFEST["protocol_version"] == PROTOCOL_VERSION
    kinds = {(c["kind"], c["codec"], c["valid"]) for c in CASES.values()}
    assert {("payload", "topk-int8", True), ("payload", "none", True), ("envelope", "topk-int8", True),
            ("payload", "topk-int8", False), ("payload", "none", False), ("envelope", "topk-int8", False)} <= kinds


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c["valid"] and c["kind"] == "payload"])
def test_valid_payloads_decode_to_the_stored_arrays(name: str) -> None:
    case = CASES[name]
    spec = SPECS[case["spec"]]
    payload = (VECTORS / f"{name}.bin").read_bytes()
    expected = _npy(f"{name}.decoded.npy")
    assert expected.dtype == np.float32 and expected.shape == (spec.size,)
    np.testing.assert_array_equal(decode(case["codec"], payload, spec), expected)
    np.testing.assert_array_equal(decode_sparse(case["codec"], payload, spec).to_dense(), expected)
    # the reference encoder still produces these exact bytes
    cfg = CodecConfig(name=case["codec"], **case["config"])
    seed = case["rng_seed"]
    rng = None if seed is None else np.random.default_rng(seed)
    assert encode(_npy(f"{name}.input.npy"), spec, cfg, rng) == payload


def test_valid_envelope_decodes_to_the_stored_fields_and_array() -> None:
    case = CASES["small-envelope"]
    spec = SPECS["small"]
    data = (VECTORS / "small-envelope.bin").read_bytes()
    upd = decode_update(data, spec)
    assert {k: v for k, v in upd.__dict__.items() if k != "payload"} == case["fields"]
    np.testing.assert_array_equal(decode_sparse(upd.codec, upd.payload, spec).to_dense(),
                                  _npy("small-envelope.decoded.npy"))
    assert encode_update(upd) == data


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if not c["valid"]])
def test_invalid_messages_raise_the_named_error(name: str) -> None:
    case = CASES[name]
    spec = SPECS[case["spec"]]
    data = (VECTORS / f"{name}.bin").read_bytes()
    expected: type[Exception] = getattr(errors, case["error"])
    with pytest.raises(errors.WireError) as info:
        if case["kind"] == "envelope":
            decode_update(data, spec)
        else:
            decode_sparse(case["codec"], data, spec)
    assert type(info.value) is expected, f"{name}: {info.value!r}"


def test_generator_reproduces_the_stored_files() -> None:
    spec = importlib.util.spec_from_file_location("make_vectors", VECTORS / "make_vectors.py")
    assert spec is not None and spec.loader is not None
    module: Any = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    files = module.build()
    stored = {p.name for p in VECTORS.iterdir() if p.name != "make_vectors.py" and p.is_file()}
    assert set(files) == stored
    for name, content in files.items():
        assert (VECTORS / name).read_bytes() == content, name
