"""A strict reader for the msgpack subset fedmq messages use (docs/wire-format.md, rules R2-R13).

The client update envelope (:mod:`fedmq.wire.envelope`) and the control messages
(:mod:`fedmq.wire.messages`) are msgpack maps. msgpack-python accepts more than the spec allows
(``bin`` keys pass ``strict_map_key``, a zero-length ext passes ``max_ext_len=0``, the
timestamp ext bypasses ``ext_hook``, duplicate keys silently keep the last value) and reports
nesting and key problems at points that depend on the library, so an independent decoder
could not tell which rule a message breaks. This reader checks every rule at one defined
point, in byte order, and reports the first one a message breaks; the writer stays
``msgpack.packb``.

Every refusal is a :class:`~fedmq.errors.WireError` whose message ends with the rule id,
e.g. ``(rule R6)``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import msgpack

from fedmq.errors import WireError

_EXT = frozenset((0xC7, 0xC8, 0xC9, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8))
_F32 = struct.Struct(">f")
_F64 = struct.Struct(">d")
#: Fixed-width items: type byte -> (struct of the bytes after it).
_SCALARS = {0xCC: struct.Struct(">B"), 0xCD: struct.Struct(">H"), 0xCE: struct.Struct(">I"),
            0xCF: struct.Struct(">Q"), 0xD0: struct.Struct(">b"), 0xD1: struct.Struct(">h"),
            0xD2: struct.Struct(">i"), 0xD3: struct.Struct(">q"), 0xCA: _F32, 0xCB: _F64}
#: Length-prefixed items: type byte -> (kind, struct of the length).
_SIZED = {0xC4: ("bin", struct.Struct(">B")), 0xC5: ("bin", struct.Struct(">H")), 0xC6: ("bin", struct.Struct(">I")),
          0xD9: ("str", struct.Struct(">B")), 0xDA: ("str", struct.Struct(">H")), 0xDB: ("str", struct.Struct(">I")),
          0xDC: ("array", struct.Struct(">H")), 0xDD: ("array", struct.Struct(">I")),
          0xDE: ("map", struct.Struct(">H")), 0xDF: ("map", struct.Struct(">I"))}


@dataclass(frozen=True)
class Limits:
    """Bounds on one message (docs/wire-format.md, "Messages: msgpack rules").

    Fields:
        max_str: longest ``str``, bytes of UTF-8 (R9).
        max_entries: most entries of one array or map (R10).
        max_depth: deepest container; the top-level map is at depth 1 (R8).
        max_items: most msgpack objects in the message, every key, value and container
            counted (R7).
    """

    max_str: int = 16384
    max_entries: int = 256
    max_depth: int = 8
    max_items: int = 4096


DEFAULT_LIMITS = Limits()


def _kind(t: int) -> str:
    if t <= 0x7F or t >= 0xE0 or 0xCC <= t <= 0xD3:
        return "int"
    if 0x80 <= t <= 0x8F:
        return "map"
    if 0x90 <= t <= 0x9F:
        return "array"
    if 0xA0 <= t <= 0xBF:
        return "str"
    if t in (0xC0, 0xC2, 0xC3):
        return "nil/bool"
    if t in (0xCA, 0xCB):
        return "float"
    return _SIZED[t][0]


class _Reader:
    __slots__ = ("buf", "pos", "items", "lim", "where")

    def __init__(self, buf: memoryview, lim: Limits, where: str) -> None:
        self.buf = buf
        self.pos = 0
        self.items = 0
        self.lim = lim
        self.where = where

    def fail(self, rule: str, what: str, at: int) -> WireError:
        return WireError(f"{self.where}: {what} at byte {at} (rule {rule})")

    def need(self, n: int, what: str, at: int) -> None:
        if self.pos + n > len(self.buf):
            raise self.fail("R2", f"truncated message: {what} needs {n} bytes, {len(self.buf) - self.pos} left", at)

    def item(self, depth: int, role: str) -> Any:
        """One object; ``role`` is "top", "key" or "value"."""
        at = self.pos
        self.need(1, "a type byte", at)
        t = self.buf[at]
        self.pos += 1
        if t == 0xC1:
            raise self.fail("R3", "reserved type byte 0xc1", at)
        if t in _EXT:
            raise self.fail("R4", f"msgpack ext type (byte 0x{t:02x}) is not allowed", at)
        kind = _kind(t)
        if role == "key" and kind != "str":
            raise self.fail("R6", f"map key must be a str, got {kind}", at)
        if role == "top" and kind != "map":
            raise self.fail("R5", f"message must be a map, got {kind}", at)
        self.items += 1
        if self.items > self.lim.max_items:
            raise self.fail("R7", f"more than {self.lim.max_items} msgpack objects", at)
        if kind in ("map", "array") and depth > self.lim.max_depth:
            raise self.fail("R8", f"containers nested deeper than {self.lim.max_depth}", at)
        # fixed-size items and fix-length headers
        if t <= 0x7F:
            return t
        if t >= 0xE0:
            return t - 0x100
        if t == 0xC0:
            return None
        if t in (0xC2, 0xC3):
            return t == 0xC3
        if t in _SCALARS:
            st = _SCALARS[t]
            self.need(st.size, f"a {kind}", at)
            (value,) = st.unpack_from(self.buf, self.pos)
            self.pos += st.size
            return value
        if t <= 0xBF:
            length = t & (0x0F if t <= 0x9F else 0x1F)
        else:
            st = _SIZED[t][1]
            self.need(st.size, f"a {kind} length", at)
            (length,) = st.unpack_from(self.buf, self.pos)
            self.pos += st.size
        if kind == "str" and length > self.lim.max_str:
            raise self.fail("R9", f"str of {length} bytes, at most {self.lim.max_str} allowed", at)
        if kind in ("map", "array") and length > self.lim.max_entries:
            raise self.fail("R10", f"{kind} of {length} entries, at most {self.lim.max_entries} allowed", at)
        if kind == "array":
            return [self.item(depth + 1, "value") for _ in range(length)]
        if kind == "map":
            out: dict[str, Any] = {}
            for _ in range(length):
                key_at = self.pos
                key = self.item(depth + 1, "key")
                if key in out:
                    raise self.fail("R12", f"duplicate map key {key[:80]!r}", key_at)
                out[key] = self.item(depth + 1, "value")
            return out
        self.need(length, f"a {kind} of {length} bytes", at)
        raw = self.buf[self.pos:self.pos + length]
        self.pos += length
        if kind == "bin":
            return bytes(raw)
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError:
            raise self.fail("R11", "str is not valid UTF-8", at) from None


def unpack_map(data: bytes | bytearray | memoryview, where: str, limits: Limits = DEFAULT_LIMITS) -> dict[str, Any]:
    """Parse one message: a msgpack map with str keys, checked against rules R2-R13.

    Args:
        data: the whole message (its size was already bounded by the caller, rule R1).
        where: what the message is, for error messages (e.g. ``"update"``).
        limits: the bounds of rules R7-R10.

    Returns:
        The map; ``bin`` values as bytes, ``str`` as str, arrays as lists, ints as int
        (uint64 and int64 ranges), floats as float.

    Raises:
        WireError: the first rule the message breaks, in byte order; the message ends with
            ``(rule Rn)``.
    """
    buf = memoryview(data)
    if buf.ndim != 1 or buf.itemsize != 1:
        buf = buf.cast("B")
    # bytes, not the view: comparing bytes with a memoryview goes element by element.
    fast = _canonical(data if type(data) is bytes else buf.tobytes(), limits)
    if fast is not None:
        return fast
    rd = _Reader(buf, limits, where)
    obj = rd.item(1, "top")
    if rd.pos != len(buf):
        raise rd.fail("R13", f"{len(buf) - rd.pos} bytes after the message's map", rd.pos)
    return obj


_PLAIN = frozenset((str, bytes, int, float, bool, type(None)))
_STR = frozenset((str,))


def _canonical(buf: bytes, lim: Limits) -> dict[str, Any] | None:
    """The fast path of :func:`unpack_map`: the map when ``buf`` is exactly what
    ``msgpack.packb(map, use_bin_type=True)`` writes for it and the map keeps every rule,
    else None (the strict reader then finds the first rule broken).

    msgpack-python's C decoder is about 4x faster than the strict reader on a client update
    envelope (8 vs 30 us); it is trusted only for messages it proves canonical: re-encoding
    gives the same bytes (so no duplicate keys, no float32 or non-minimal lengths, nothing
    after the map), every object is a plain type (no ext or timestamp), and the walk below
    checks rules R5-R10 the way :class:`_Reader` counts them."""
    try:
        # The C decoder checks R9 (str bytes, keys included) and R10 (entries) itself.
        obj = msgpack.unpackb(buf, raw=False, strict_map_key=False, use_list=True, max_str_len=lim.max_str,
                              max_array_len=lim.max_entries, max_map_len=lim.max_entries)
    except (ValueError, TypeError, msgpack.UnpackException):
        return None
    if not isinstance(obj, dict):
        return None
    try:
        if msgpack.packb(obj, use_bin_type=True) != buf:
            return None
    except (ValueError, TypeError, OverflowError):
        return None
    max_depth = lim.max_depth
    items = 0  # every key, value and container, as _Reader counts them (R7)
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        items += 1
        if depth > max_depth:
            return None
        if type(node) is dict:
            if not _STR.issuperset(map(type, node)):
                return None
            items += len(node)  # the keys
            values: Any = node.values()
        else:
            values = node
        if _PLAIN.issuperset(map(type, values)):  # no container inside: the common case, in C
            items += len(values)
            continue
        for value in values:
            kind = type(value)
            if kind is dict or kind is list:
                stack.append((value, depth + 1))
            elif kind in _PLAIN:
                items += 1
            else:
                return None
    if items > lim.max_items:
        return None
    return obj
