"""Client update envelope: round trips and strict decoding (only WireError, nothing else)."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmq import PROTOCOL_VERSION
from fedmq.codecs import CodecSpec, decode_sparse, encode
from fedmq.wire.envelope import ClientUpdate, decode_update, encode_update, max_update_bytes
from fedmq.errors import CodecError, SpecMismatchError, WireError
from fedmq.model.params import ParamSpec

SPEC = ParamSpec(("w", "b"), ((40, 30), (30,)), ("float32", "float32"))
X = np.random.default_rng(0).standard_normal(SPEC.size).astype(np.float32)
PAYLOAD = encode(X, SPEC, CodecSpec.of(density=0.05, dense_below=64))


def _update(**over: object) -> ClientUpdate:
    fields = dict(federation="fed-1", device="dev_7", round=3, base_version=2, samples=800, kind="delta",
                  spec_hash=SPEC.hash, codec="topk-int8", payload=PAYLOAD,
                  metrics={"train_loss": 0.25, "seconds": 1.5})
    fields.update(over)
    return ClientUpdate(**fields)  # type: ignore[arg-type]


def _raw(**over: object) -> bytes:
    body = {"v": PROTOCOL_VERSION, "type": "update", "federation": "fed-1", "device": "dev_7", "round": 3,
            "base_version": 2, "samples": 800, "kind": "delta", "spec_hash": SPEC.hash, "codec": "topk-int8",
            "metrics": {"train_loss": 0.25}, "payload": PAYLOAD}
    for key, value in over.items():
        if value is _DROP:
            del body[key]
        else:
            body[key] = value
    return msgpack.packb(body, use_bin_type=True)


_DROP = object()


@settings(max_examples=50, deadline=None)
@given(round_=st.integers(0, 2**63 - 1), base=st.integers(0, 2**40), samples=st.integers(0, 10**9),
       kind=st.sampled_from(["delta", "gradient"]),
       metrics=st.dictionaries(st.from_regex(r"[A-Za-z0-9_./-]{1,64}", fullmatch=True),
                               st.floats(allow_nan=False, allow_infinity=False), max_size=8),
       device=st.from_regex(r"[A-Za-z0-9_.-]{1,64}", fullmatch=True))
def test_round_trip(round_, base, samples, kind, metrics, device) -> None:  # type: ignore[no-untyped-def]
    upd = _update(round=round_, base_version=base, samples=samples, kind=kind, metrics=metrics, device=device)
    assert decode_update(encode_update(upd), SPEC) == upd


def test_the_decoded_payload_is_the_update() -> None:
    upd = decode_update(encode_update(_update()), SPEC)
    assert decode_sparse(upd.codec, upd.payload, SPEC).l2_norm() > 0
    none = _update(codec="none", payload=encode(X, SPEC, CodecSpec.of(name="none")))
    upd = decode_update(encode_update(none), SPEC)
    np.testing.assert_array_equal(decode_sparse("none", upd.payload, SPEC).values, X)


@pytest.mark.parametrize(("data", "match"), [
    (_raw(v=2), r"protocol version.*R14"),
    (_raw(v=_DROP), r"protocol version.*R14"),
    (_raw(v=True), r"protocol version.*R14"),
    (_raw(v=1.0), r"protocol version.*R14"),
    (_raw(type="task"), r"type.*R15"),
    (_raw(federation="a/b"), r"federation.*R16"),
    (_raw(device=""), r"device.*R16"),
    (_raw(device="x" * 65), r"device.*R16"),
    (_raw(device=7), r"device.*R16"),
    (_raw(device="dev_7\n"), r"device.*R16"),  # "$" of re.match would let the line feed through
    (_raw(spec_hash=SPEC.hash + "\n"), r"spec_hash.*R19"),
    (_raw(round=-1), r"round.*R17"),
    (_raw(round=2**64 - 1), r"round.*R17"),
    (_raw(round=True), r"round.*R17"),
    (_raw(round=1.0), r"round.*R17"),
    (_raw(base_version=_DROP), r"base_version.*R17"),
    (_raw(samples=-5), r"samples.*R17"),
    (_raw(kind="weights"), r"kind.*R18"),
    (_raw(spec_hash="XYZ"), r"spec_hash.*R19"),
    (_raw(codec="gzip"), r"codec.*R18"),
    (_raw(payload="text"), r"payload.*R21"),
    (_raw(payload=_DROP), r"payload.*R21"),
    (_raw(metrics=[1, 2]), r"metrics.*R20"),
    (_raw(metrics={"loss": float("nan")}), r"finite.*R20"),
    (_raw(metrics={"loss": "low"}), r"number.*R20"),
    (_raw(metrics={"bad key": 1.0}), r"metric name.*R20"),
    (_raw(metrics={"loss\n": 1.0}), r"metric name.*R20"),
    (_raw(metrics={"loss": True}), r"number.*R20"),
    (_raw(metrics={f"m{i}": 1.0 for i in range(65)}), r"metrics.*R20"),
    (msgpack.packb([1, 2, 3]), r"map.*R5"),
    (b"\xc1", r"0xc1.*R3"),
    (msgpack.packb({1: 2}), r"key must be a str.*R6"),
    (_raw() + b"\x00", r"after.*R13"),
    (b"", r"truncated.*R2"),
])
def test_malformed_envelopes_raise_wire_error(data: bytes, match: str) -> None:
    with pytest.raises(WireError, match=match):
        decode_update(data, SPEC)


def test_spec_mismatch_and_impossible_payload_sizes() -> None:
    with pytest.raises(SpecMismatchError):
        decode_update(_raw(spec_hash="0123456789abcdef"), SPEC)
    with pytest.raises(CodecError, match="impossible"):
        decode_update(_raw(codec="none"), SPEC)  # a topk payload is not 4 * size bytes
    huge = b"\x00" * (10 * SPEC.size + 1000)
    with pytest.raises(CodecError, match="impossible"):
        decode_update(_raw(payload=huge), SPEC)


def test_size_limits_are_checked_before_parsing() -> None:
    data = encode_update(_update())
    with pytest.raises(WireError, match="limit"):
        decode_update(data, SPEC, max_bytes=len(data) - 1)
    assert decode_update(data, SPEC, max_bytes=len(data)).device == "dev_7"
    with pytest.raises(WireError, match="limit"):
        decode_update(b"\x00" * (max_update_bytes(SPEC) + 1), SPEC)
    # a declared bin length far beyond the message is refused, not allocated
    with pytest.raises(WireError):
        decode_update(b"\xc6\xff\xff\xff\xf0", SPEC)
    with pytest.raises(WireError):
        decode_update(b"\xdf\xff\xff\xff\xff", SPEC)
    with pytest.raises(WireError):
        decode_update(bytearray(b"\x91" * 100_000), SPEC)  # deep nesting


def test_encode_refuses_what_decode_would_refuse() -> None:
    for bad in ({"kind": "weights"}, {"device": "a b"}, {"round": -1}, {"metrics": {"x": float("inf")}}):
        with pytest.raises(WireError):
            encode_update(_update(**bad))


def test_every_truncation_raises_wire_error() -> None:
    data = encode_update(_update())
    for cut in range(len(data)):
        with pytest.raises(WireError):
            decode_update(data[:cut], SPEC)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_decode_or_raise_wire_error(data: bytes) -> None:
    try:
        decode_update(data, SPEC)
    except WireError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4))
def test_mutated_updates_decode_completely_or_raise_wire_error(edits) -> None:  # type: ignore[no-untyped-def]
    data = bytearray(encode_update(_update()))
    for pos, byte in edits:
        data[pos % len(data)] = byte
    try:
        upd = decode_update(bytes(data), SPEC)
        su = decode_sparse(upd.codec, upd.payload, SPEC)
    except WireError:
        return
    assert np.isfinite(su.values).all()
