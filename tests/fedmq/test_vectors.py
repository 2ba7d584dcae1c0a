"""The stored wire-format test vectors (tests/vectors/, docs/wire-format.md) against the decoders.

Every case in the manifest is decoded; every file in the folder must belong to a case. The
boundary cases (``R<n>-inside`` / ``R<n>-outside``) pin each refusal rule of the spec at its
limit: the error class and the rule id fedmq reports must be the manifest's.
"""

from __future__ import annotations

import importlib.util
import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedmq import PROTOCOL_VERSION, errors
from fedmq.codecs import CodecSpec, decode, decode_sparse, encode
from fedmq.wire.envelope import decode_update, encode_update
from fedmq.wire.messages import Receipt, RoundTask
from fedmq.model.params import ParamSpec

VECTORS = Path(__file__).resolve().parents[1] / "vectors"
MANIFEST = json.loads((VECTORS / "manifest.json").read_text())
SPECS = {name: ParamSpec.from_dict(d) for name, d in MANIFEST["specs"].items()}
CASES = {c["name"]: c for c in MANIFEST["cases"]}
CONTROL = {"receipt": Receipt, "task": RoundTask}
#: The spec's refusal rules (docs/wire-format.md, "Refusal rules").
RULES = [f"R{i}" for i in range(1, 45)]


def _npy(name: str) -> np.ndarray:
    return np.load(io.BytesIO((VECTORS / name).read_bytes()), allow_pickle=False)


def _bits(a: np.ndarray) -> np.ndarray:
    """float32 as its bit patterns, so that -0.0 and 0.0 differ."""
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def _rule(exc: BaseException) -> str | None:
    m = re.search(r"\(rule (R\d+)\)$", str(exc))
    return m.group(1) if m else None


def _decode(case: dict[str, Any], data: bytes) -> Any:
    spec = SPECS[case["spec"]]
    if case["kind"] == "envelope":
        upd = decode_update(data, spec)
        return upd, decode_sparse(upd.codec, upd.payload, spec)
    if case["kind"] == "control":
        return CONTROL[case["message"]].from_bytes(data)
    return decode_sparse(case["codec"], data, spec)


def test_manifest_covers_every_kind_of_case() -> None:
    assert MANIFEST["protocol_version"] == PROTOCOL_VERSION
    kinds = {(c["kind"], c["codec"], c["valid"]) for c in CASES.values()}
    assert {("payload", "topk-int8", True), ("payload", "none", True), ("envelope", "topk-int8", True),
            ("payload", "topk-int8", False), ("payload", "none", False), ("envelope", "topk-int8", False),
            ("control", "", True), ("control", "", False)} <= kinds


@pytest.mark.security
def test_every_rule_has_a_vector_on_each_side_of_its_boundary() -> None:
    sides = {(c["rule"], c["boundary"]) for c in CASES.values() if "boundary" in c}
    missing = [(r, side) for r in RULES for side in ("inside", "outside") if (r, side) not in sides]
    assert not missing
    for c in CASES.values():
        assert c["valid"] or c.get("rule") in RULES, c["name"]  # every refusal names its rule
        if c.get("boundary") == "outside":
            assert not c["valid"], c["name"]


def test_every_file_belongs_to_a_case() -> None:
    expected = {"make_vectors.py", "manifest.json"}
    for name, c in CASES.items():
        expected.add(f"{name}.bin")
        if c["valid"] and c["kind"] != "control":
            expected.add(f"{name}.decoded.npy")
        if c.get("encoder") and c["kind"] == "payload":
            expected.add(f"{name}.input.npy")
        if c.get("control"):
            expected.add(f"{name}.control.npy")
    stored = {p.name for p in VECTORS.iterdir() if p.is_file()}
    assert stored - expected == set(), "files in tests/vectors/ that manifest.json does not list"
    assert expected - stored == set(), "cases whose files are missing"


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c["valid"] and c["kind"] == "payload"])
def test_valid_payloads_decode_to_the_stored_arrays(name: str) -> None:
    case = CASES[name]
    spec = SPECS[case["spec"]]
    payload = (VECTORS / f"{name}.bin").read_bytes()
    expected = _npy(f"{name}.decoded.npy")
    assert expected.dtype == np.float32 and expected.shape == (spec.size,)
    np.testing.assert_array_equal(_bits(decode(case["codec"], payload, spec)), _bits(expected))
    np.testing.assert_array_equal(_bits(decode_sparse(case["codec"], payload, spec).to_dense()), _bits(expected))
    if case.get("encoder"):  # the reference encoder still produces these exact bytes
        cfg = CodecSpec.from_table(case["codec"], case["config"])
        seed = case["rng_seed"]
        rng = None if seed is None else np.random.default_rng(seed)
        assert encode(_npy(f"{name}.input.npy"), spec, cfg, rng) == payload


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c["valid"] and c["kind"] == "envelope"])
def test_valid_envelopes_decode_to_the_stored_fields_and_array(name: str) -> None:
    case = CASES[name]
    data = (VECTORS / f"{name}.bin").read_bytes()
    upd, sparse = _decode(case, data)
    assert {k: v for k, v in upd.__dict__.items() if k not in ("payload", "control")} == case["fields"]
    np.testing.assert_array_equal(_bits(sparse.to_dense()), _bits(_npy(f"{name}.decoded.npy")))
    if case.get("control"):  # Scaffold's second payload, same codec
        control = decode_sparse(upd.codec, upd.control, SPECS[case["spec"]]).to_dense()
        np.testing.assert_array_equal(_bits(control), _bits(_npy(f"{name}.control.npy")))
    else:
        assert upd.control == b""
    if case.get("encoder"):
        assert encode_update(upd) == data


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c["valid"] and c["kind"] == "control"])
def test_valid_control_messages_decode_to_the_stored_fields(name: str) -> None:
    case = CASES[name]
    msg = _decode(case, (VECTORS / f"{name}.bin").read_bytes())
    for key, value in case["fields"].items():
        if key == "plan":
            assert {k: msg.plan.as_table()[k] for k in value} == value
        else:
            assert getattr(msg, key) == value, key


@pytest.mark.security
@pytest.mark.parametrize("name", [n for n, c in CASES.items() if not c["valid"]])
def test_invalid_messages_raise_the_named_error_and_rule(name: str) -> None:
    case = CASES[name]
    data = (VECTORS / f"{name}.bin").read_bytes()
    expected: type[Exception] = getattr(errors, case["error"])
    with pytest.raises(errors.WireError) as info:
        _decode(case, data)
    assert type(info.value) is expected, f"{name}: {info.value!r}"
    assert _rule(info.value) == case.get("refused_by", case["rule"]), f"{name}: {info.value}"


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
