"""Control messages encode to the same bytes whether their fields are packed as they are
(the fast path for flat messages: receipts and statuses, one per client update and per
presence change) or through ``dataclasses.asdict`` (the path for nested fields)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import ClassVar

import msgpack

from fedmq import PROTOCOL_VERSION
from fedmq.wire.messages import ModelPointer, Receipt, RoundAnnouncement, Status, _Message


def _reference(msg: object) -> bytes:
    return msgpack.packb({"v": PROTOCOL_VERSION, "type": type(msg).TYPE, **asdict(msg)}, use_bin_type=True)


def test_flat_messages_encode_as_asdict_would() -> None:
    receipts = [Receipt("dev-1", 7, "a" * 32, "accepted"), Receipt("dev-2", 0, "t", "rejected", "norm_bound")]
    for msg in receipts:
        assert msg.to_bytes() == _reference(msg)
        assert Receipt.from_bytes(msg.to_bytes()) == msg
    status = Status.from_bytes(_reference(Status("dev-1", True, "mnist-cnn", "0123456789abcdef", 100, "0.3", 1.5)))
    assert status.to_bytes() == _reference(status)


def test_every_message_class_encodes_as_asdict_would() -> None:
    """Model pointers and round announcements too (key order included), and they read back."""
    messages = [ModelPointer(3, "0123456789abcdef", 2, 1234, "ab" * 32),
                RoundAnnouncement(4, 3, 1700000000.25, "closed")]
    for msg in messages:
        assert msg.to_bytes() == _reference(msg)
        assert type(msg).from_bytes(msg.to_bytes()) == msg


@dataclass(frozen=True)
class _Span:
    first: int
    last: int


def test_a_nested_field_takes_the_asdict_path() -> None:
    """A message with a field that is not a plain value (a nested dataclass, which msgpack
    cannot pack as it is, and a list) is encoded by ``asdict``, in the same key order."""
    @dataclass(frozen=True)
    class Listing(_Message):
        TYPE: ClassVar[str] = "listing"
        name: str
        span: _Span
        items: list[int] = field(default_factory=list)
        last: int = 0

    msg = Listing("x", _Span(2, 5), [1, 2, 3], 9)
    assert msg.to_bytes() == _reference(msg)
    body = msgpack.unpackb(msg.to_bytes())
    assert list(body) == ["v", "type", "name", "span", "items", "last"]
    assert body["span"] == {"first": 2, "last": 5}
