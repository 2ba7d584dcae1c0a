"""The strict msgpack reader's fast path (``_canonical``, msgpack-python's C decoder trusted
only for canonical messages) never accepts what the strict reader refuses, and returns the
same map when it accepts."""

from __future__ import annotations

import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmq.errors import WireError
from fedmq.wire.strict_msgpack import DEFAULT_LIMITS, Limits, _canonical, _Reader, unpack_map

_scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1),
                     st.floats(allow_nan=False), st.binary(max_size=40), st.text(max_size=20))
_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                         st.dictionaries(st.text(max_size=8), inner, max_size=5)),
                       max_leaves=30)
_maps = st.dictionaries(st.text(max_size=10), _values, max_size=8)


def _strict(data: bytes, limits: Limits = DEFAULT_LIMITS) -> object:
    """The strict reader alone (no fast path): the map, or the WireError it raises."""
    buf = memoryview(data)
    rd = _Reader(buf, limits, "test")
    try:
        obj = rd.item(1, "top")
        if rd.pos != len(buf):
            raise rd.fail("R13", "trailing bytes", rd.pos)
    except WireError as exc:
        return exc
    return obj


def _agree(data: bytes, limits: Limits = DEFAULT_LIMITS) -> object:
    fast = _canonical(data, limits)
    strict = _strict(data, limits)
    if fast is not None:
        assert not isinstance(strict, WireError), strict
        # Compared through their encodings, bit for bit (NaN != NaN; True == 1 in Python).
        assert msgpack.packb(fast, use_bin_type=True) == msgpack.packb(strict, use_bin_type=True)
        assert repr(fast) == repr(strict)
    return fast


@settings(max_examples=300, deadline=None)
@given(_maps)
def test_canonical_maps_take_the_fast_path_with_the_same_result(obj: dict[str, object]) -> None:
    data = msgpack.packb(obj, use_bin_type=True)
    assert _agree(data) is not None or isinstance(_strict(data), WireError)


@settings(max_examples=300, deadline=None)
@given(_maps, st.data())
def test_mutated_messages_never_pass_the_fast_path_alone(obj: dict[str, object], data: st.DataObject) -> None:
    raw = bytearray(msgpack.packb(obj, use_bin_type=True))
    for _ in range(data.draw(st.integers(1, 3))):
        op = data.draw(st.sampled_from(["flip", "cut", "append"]))
        if op == "flip" and raw:
            raw[data.draw(st.integers(0, len(raw) - 1))] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "cut" and raw:
            del raw[data.draw(st.integers(0, len(raw) - 1)):]
        else:
            raw += data.draw(st.binary(min_size=1, max_size=4))
    _agree(bytes(raw))


@pytest.mark.parametrize("data", [
    b"\x82\xa1a\x01\xa1a\x02",                              # duplicate key (R12)
    b"\x81\xa1a\xd4\x01\x00",                               # ext (R4)
    b"\x81\xa1a\xd6\xff\x00\x00\x00\x01",                   # timestamp ext (R4)
    b"\x81\x01\x02",                                        # int key (R6)
    b"\x81\xc4\x01a\x02",                                   # bin key (R6)
    b"\x81\xa1a\x01\x00",                                   # trailing byte (R13)
    b"\x91\x01",                                            # array at the top (R5)
    b"\x81\xa1a\xa2\xff\xfe",                               # invalid UTF-8 (R11)
    b"\x81\xa1a" + b"\x81\xa1a" * 8 + b"\x01",              # nesting deeper than 8 (R8)
])
def test_refused_messages_go_to_the_strict_reader(data: bytes) -> None:
    assert _canonical(data, DEFAULT_LIMITS) is None
    with pytest.raises(WireError, match=r"\(rule R\d+\)$"):
        unpack_map(data, "test")


def test_valid_but_not_canonical_messages_are_read_by_the_strict_reader() -> None:
    for data in (b"\x81\xa1a\xca" + struct.pack(">f", 1.5),   # float32: packb writes float64
                 b"\x81\xa1a\xcd\x00\x01"):                    # uint16 for 1: packb writes a fixint
        assert _canonical(data, DEFAULT_LIMITS) is None
        assert unpack_map(data, "test") == _strict(data)


def test_limits_hold_on_the_fast_path() -> None:
    tight = Limits(max_str=4, max_entries=3, max_depth=2, max_items=7)
    for obj in ({"abcde": 1}, {"a": "abcde"}, {"a": [1, 2, 3, 4]}, {"a": {"b": [1]}}, {"a": 1, "b": 2, "c": [1]}):
        data = msgpack.packb(obj, use_bin_type=True)
        assert _canonical(data, tight) is None
        assert isinstance(_strict(data, tight), WireError)
    ok = msgpack.packb({"a": [1, 2], "b": 1}, use_bin_type=True)
    assert _agree(ok, tight) == {"a": [1, 2], "b": 1}


@settings(max_examples=200, deadline=None)
@given(_maps, st.binary(min_size=0, max_size=70000), st.data())
def test_maps_ending_in_a_large_bin_agree_with_the_strict_reader(obj: dict[str, object], payload: bytes,
                                                                 data: st.DataObject) -> None:
    """The client update's shape (a bin last, of any of the three bin lengths): the fast
    path agrees with the strict reader on the message and on damaged copies of it (header
    bytes flipped, bytes cut or added, the last key repeated)."""
    obj = {**{k: v for k, v in obj.items() if k != "payload"}, "payload": payload}
    good = msgpack.packb(obj, use_bin_type=True)
    assert _agree(good) is not None or isinstance(_strict(good), WireError)
    raw = bytearray(good)
    op = data.draw(st.sampled_from(["flip", "cut", "append", "repeat"]))
    head = len(good) - len(payload)
    if op == "flip":
        raw[data.draw(st.integers(0, head - 1))] ^= 1 << data.draw(st.integers(0, 7))
    elif op == "cut":
        del raw[data.draw(st.integers(0, len(raw) - 1)):]
    elif op == "append":
        raw += data.draw(st.binary(min_size=1, max_size=4))
    else:  # "payload" twice: msgpack-python keeps the last value under the first key's place
        raw[0] += 1  # a fixmap: at most 9 entries
        raw += msgpack.packb("payload") + msgpack.packb(b"x", use_bin_type=True)
    _agree(bytes(raw))
