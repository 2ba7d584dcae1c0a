"""Gaps the wire spec closed (issue 27): the manifest's ``round``, the formats a ModelPointer
may name, and the order of R24 / R25 (field by field: a field's type, then its range, then
the next field)."""

from __future__ import annotations

import msgpack
import pytest

from fedmq.errors import WireError
from fedmq.wire.messages import ModelPointer, Receipt
from fedmq.transport.wire import Manifest


def _control(type_: str, **fields) -> bytes:
    return msgpack.packb({"v": 1, "type": type_, **fields}, use_bin_type=True)


def test_the_manifest_carries_the_round_and_refuses_a_bad_one():
    m = Manifest.build(b"\x01" * 16, b"abc", 1024, inline=True, round_=12)
    assert Manifest.from_bytes(m.to_bytes()).round == 12
    assert Manifest.from_bytes(Manifest.build(b"\x01" * 16, b"abc", 1024, inline=True).to_bytes()).round is None
    for bad in (-1, True, 1.0, "3", 2**63):
        body = Manifest.build(b"\x01" * 16, b"abc", 1024, inline=True, round_=0).to_bytes().replace(
            b"\xa5round\x00", b"\xa5round" + msgpack.packb(bad))
        with pytest.raises(WireError, match="'round'"):
            Manifest.from_bytes(body)


def test_model_pointer_refuses_a_format_outside_the_spec():
    ok = ModelPointer(1, "0123456789abcdef", 1, 3, "00" * 32, "onnx")
    assert ModelPointer.from_bytes(ok.to_bytes()).format == "onnx"
    with pytest.raises(WireError, match=r"format.*\(rule R25\)"):
        ModelPointer.from_bytes(ModelPointer(1, "0123456789abcdef", 1, 3, "00" * 32, "pt").to_bytes())


def test_r24_and_r25_go_field_by_field():
    receipt = _control("receipt", device="d", round=1, transfer_id="t", status="maybe", reason=7)
    with pytest.raises(WireError, match=r"status.*\(rule R25\)"):
        Receipt.from_bytes(receipt)
    pointer = _control("model_pointer", version=-1, spec_hash="0123456789abcdef", round=0, size=1)
    with pytest.raises(WireError, match=r"version.*\(rule R25\)"):
        ModelPointer.from_bytes(pointer)
    pointer = _control("model_pointer", version=1, spec_hash="0123456789abcdef", round=0, size=1,
                       sha256="00" * 32, format=3)
    with pytest.raises(WireError, match=r"format.*\(rule R24\)"):
        ModelPointer.from_bytes(pointer)
