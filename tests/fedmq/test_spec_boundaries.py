"""fedmq's decoders against a rule checker written from docs/wire-format.md alone.

The checker below reads messages the way the spec's numbered refusal rules say (R1-R44, in
their order) and shares no code with fedmq: its own msgpack reader, its own topk-int8
reader working bit by bit. Hypothesis builds valid messages and mutates them at the fields
the rules name, with values at and around each rule's limit (alone and in pairs, so the
order of the rules is exercised too); fedmq and the checker must agree on accept or
refuse, on the error class and on the rule, and on the decoded values bit for bit.
"""

from __future__ import annotations

import math
import re
import struct
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedmq import errors
from fedmq.codecs import decode_sparse
from fedmq.wire.envelope import decode_update
from fedmq.wire.messages import Receipt
from fedmq.model.params import ParamSpec

pytestmark = pytest.mark.security
SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# The spec's constants, as the spec writes them.
STR_MAX, ENTRIES_MAX, DEPTH_MAX, OBJECTS_MAX = 16384, 256, 8, 4096
MAX_SCALE_BITS = 0x7C010203
INT_MAX = 2**63 - 1


class Refused(Exception):
    def __init__(self, error: str, rule: str) -> None:
        super().__init__(error, rule)
        self.outcome = (error, rule)


# ---------------------------------------------------------------- the checker: msgpack subset (R2-R13)

def _read_msgpack(data: bytes) -> dict[str, Any]:
    pos = 0
    objects = 0

    def need(n: int) -> None:
        if pos + n > len(data):
            raise Refused("WireError", "R2")

    def take(n: int) -> bytes:
        nonlocal pos
        need(n)
        pos += n
        return data[pos - n:pos]

    def obj(depth: int, role: str) -> Any:
        nonlocal objects
        t = take(1)[0]
        if t == 0xC1:
            raise Refused("WireError", "R3")
        if t in (0xC7, 0xC8, 0xC9) or 0xD4 <= t <= 0xD8:
            raise Refused("WireError", "R4")
        is_str = 0xA0 <= t <= 0xBF or 0xD9 <= t <= 0xDB
        is_map = 0x80 <= t <= 0x8F or t in (0xDE, 0xDF)
        is_array = 0x90 <= t <= 0x9F or t in (0xDC, 0xDD)
        if role == "top" and not is_map:
            raise Refused("WireError", "R5")
        if role == "key" and not is_str:
            raise Refused("WireError", "R6")
        objects += 1
        if objects > OBJECTS_MAX:
            raise Refused("WireError", "R7")
        if (is_map or is_array) and depth > DEPTH_MAX:
            raise Refused("WireError", "R8")
        if t < 0x80:
            return t
        if t >= 0xE0:
            return t - 256
        simple = {0xC0: None, 0xC2: False, 0xC3: True}
        if t in simple:
            return simple[t]
        fixed = {0xCC: ">B", 0xCD: ">H", 0xCE: ">I", 0xCF: ">Q", 0xD0: ">b", 0xD1: ">h", 0xD2: ">i", 0xD3: ">q",
                 0xCA: ">f", 0xCB: ">d"}
        if t in fixed:
            return struct.unpack(fixed[t], take(struct.calcsize(fixed[t])))[0]
        width = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4, 0xDC: 2, 0xDD: 4, 0xDE: 2, 0xDF: 4}
        if t in width:
            length = int.from_bytes(take(width[t]), "big")
        else:
            length = t & 0x0F if t < 0xA0 else t & 0x1F
        if is_str and length > STR_MAX:
            raise Refused("WireError", "R9")
        if (is_map or is_array) and length > ENTRIES_MAX:
            raise Refused("WireError", "R10")
        if is_array:
            return [obj(depth + 1, "value") for _ in range(length)]
        if is_map:
            out: dict[str, Any] = {}
            for _ in range(length):
                key = obj(depth + 1, "key")
                if key in out:
                    raise Refused("WireError", "R12")
                out[key] = obj(depth + 1, "value")
            return out
        body = take(length)
        if not is_str:
            return body
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError:
            raise Refused("WireError", "R11") from None

    top = obj(1, "top")
    if pos != len(data):
        raise Refused("WireError", "R13")
    return top


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# ---------------------------------------------------------------- the checker: envelope (R1, R14-R23)

def check_envelope(data: bytes, sizes: list[int], spec_hash: str) -> dict[str, Any]:
    size, ntensors = sum(sizes), len(sizes)
    if len(data) > max(4 * size, 9 + 16 * ntensors + 10 * size) + 16384:
        raise Refused("WireError", "R1")
    m = _read_msgpack(data)
    if not (_is_int(m.get("v")) and m["v"] == 1):
        raise Refused("WireError", "R14")
    if m.get("type") != "update":
        raise Refused("WireError", "R15")
    for key in ("federation", "device"):
        if not (isinstance(m.get(key), str) and re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", m[key])):
            raise Refused("WireError", "R16")
    for key in ("round", "base_version", "samples"):
        if not (_is_int(m.get(key)) and 0 <= m[key] <= INT_MAX):
            raise Refused("WireError", "R17")
    if m.get("kind") not in ("delta", "gradient"):
        raise Refused("WireError", "R18")
    if not (isinstance(m.get("spec_hash"), str) and re.fullmatch(r"[0-9a-f]{16}", m["spec_hash"])):
        raise Refused("WireError", "R19")
    if m.get("codec") not in ("topk-int8", "none"):
        raise Refused("WireError", "R18")
    metrics = m.get("metrics", {})
    if not isinstance(metrics, dict) or len(metrics) > 64:
        raise Refused("WireError", "R20")
    for key, value in metrics.items():
        if not re.fullmatch(r"[A-Za-z0-9_./-]{1,64}", key):
            raise Refused("WireError", "R20")
        if not ((_is_int(value) or isinstance(value, float)) and math.isfinite(value)):
            raise Refused("WireError", "R20")
    if not isinstance(m.get("payload"), bytes):
        raise Refused("WireError", "R21")
    if m["spec_hash"] != spec_hash:
        raise Refused("SpecMismatchError", "R22")
    n = len(m["payload"])
    if (m["codec"] == "none" and n != 4 * size) or (m["codec"] == "topk-int8" and n > 9 + 16 * ntensors + 10 * size):
        raise Refused("CodecError", "R23")
    return m


# ---------------------------------------------------------------- the checker: receipt (R1, R14, R15, R24, R25)

def check_receipt(data: bytes) -> dict[str, Any]:
    if len(data) > 65536:
        raise Refused("WireError", "R1")
    m = _read_msgpack(data)
    if not (_is_int(m.get("v")) and m["v"] == 1):
        raise Refused("WireError", "R14")
    if m.get("type") != "receipt":
        raise Refused("WireError", "R15")
    for key, kind, required in (("device", str, True), ("round", int, True), ("transfer_id", str, True),
                                ("status", str, True), ("reason", str, False)):
        value = m.get(key)
        if value is None:
            if required:
                raise Refused("WireError", "R24")
            continue
        if isinstance(value, bool) or not isinstance(value, kind):
            raise Refused("WireError", "R24")
        if key == "round" and value < 0:
            raise Refused("WireError", "R25")
        if key == "status" and value not in ("accepted", "rejected"):
            raise Refused("WireError", "R25")
    return m


# ---------------------------------------------------------------- the checker: codecs (R26-R44)

def _f32(bits: int) -> np.float32:
    return np.frombuffer(struct.pack("<I", bits), dtype="<f4")[0]


def check_topk(buf: bytes, sizes: list[int]) -> np.ndarray:
    size, ntensors = sum(sizes), len(sizes)
    if len(buf) > 9 + 16 * ntensors + 10 * size:
        raise Refused("CodecError", "R26")
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(buf):
            raise Refused("CodecError", "R27")
        pos += n
        return buf[pos - n:pos]

    fmt, block, t = struct.unpack("<BII", take(9))
    if fmt != 1:
        raise Refused("CodecError", "R28")
    if block == 0:
        raise Refused("CodecError", "R29")
    if t != ntensors:
        raise Refused("CodecError", "R30")
    out = np.zeros(size, dtype=np.float32)
    offset = 0
    for n in sizes:
        mode = take(1)[0]
        if mode == 0:
            positions = list(range(n))
        elif mode == 1:
            k, b, ulen = struct.unpack("<IBI", take(9))
            if not 1 <= k <= n:
                raise Refused("CodecError", "R32")
            if b > 30 or 2**b > n:
                raise Refused("CodecError", "R33")
            if not 1 <= ulen <= -(-(k + ((n - k) >> b)) // 8):
                raise Refused("CodecError", "R34")
            unary = take(ulen)
            ones = [p for p in range(8 * ulen) if unary[p // 8] >> (7 - p % 8) & 1]
            if len(ones) != k or ones[-1] // 8 != ulen - 1:
                raise Refused("CodecError", "R35")
            rem = take(-(-(k * b) // 8))
            rbits = [rem[p // 8] >> (7 - p % 8) & 1 for p in range(8 * len(rem))]
            if any(rbits[k * b:]):
                raise Refused("CodecError", "R36")
            positions, i, prev = [], -1, -1
            for j in range(k):
                quotient = ones[j] - prev - 1
                prev = ones[j]
                r = int("".join(map(str, rbits[j * b:(j + 1) * b])) or "0", 2)
                i = i + 1 + ((quotient << b) | r)
                positions.append(i)
            if positions[-1] >= n:
                raise Refused("CodecError", "R37")
        else:
            raise Refused("CodecError", "R31")
        count = len(positions)
        scales = struct.unpack(f"<{-(-count // block)}I", take(4 * -(-count // block)))
        if any(s & 0x7F800000 == 0x7F800000 for s in scales):
            raise Refused("NonFiniteError", "R38")
        if any(s >> 31 and s != 0x80000000 for s in scales):
            raise Refused("CodecError", "R39")
        if any(s > MAX_SCALE_BITS and not s >> 31 for s in scales):
            raise Refused("NonFiniteError", "R40")
        q = struct.unpack(f"<{count}b", take(count))
        if -128 in q:
            raise Refused("CodecError", "R41")
        for m, (p, v) in enumerate(zip(positions, q)):
            out[offset + p] = np.float32(v) * _f32(scales[m // block])
        offset += n
    if pos != len(buf):
        raise Refused("CodecError", "R42")
    return out


def check_none(buf: bytes, sizes: list[int]) -> np.ndarray:
    if len(buf) != 4 * sum(sizes):
        raise Refused("CodecError", "R43")
    out = np.frombuffer(buf, dtype="<f4").astype(np.float32)
    if not np.isfinite(out).all():
        raise Refused("NonFiniteError", "R44")
    return out


# ---------------------------------------------------------------- comparing

def _outcome(fn: Any, *args: Any) -> tuple[Any, Any]:
    try:
        return None, fn(*args)
    except Refused as exc:
        return exc.outcome, None


def _fedmq_outcome(fn: Any, *args: Any) -> tuple[Any, Any]:
    try:
        return None, fn(*args)
    except errors.WireError as exc:
        m = re.search(r"\(rule (R\d+)\)$", str(exc))
        return (type(exc).__name__, m.group(1) if m else None), None


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool((a.view(np.uint32) == b.view(np.uint32)).all())


# ---------------------------------------------------------------- generating topk-int8 payloads

SCALE_BITS = [0, 0x3C010204, 0x3F800000, MAX_SCALE_BITS - 1, MAX_SCALE_BITS, MAX_SCALE_BITS + 1, 0x7F7FFFFF,
              0x7F800000, 0x7F800001, 0x7FC00000, 0x80000000, 0x80000001, 0xBF800000, 0xFF800000, 0x00000001]


def _pack_bits(bits: list[int]) -> bytes:
    bits = bits + [0] * (-len(bits) % 8)
    return bytes(int("".join(map(str, bits[i:i + 8])), 2) for i in range(0, len(bits), 8))


@st.composite
def topk_payloads(draw: Any) -> tuple[list[int], bytes]:
    sizes = draw(st.lists(st.integers(1, 70), min_size=1, max_size=3))
    block = draw(st.sampled_from([1, 2, 3, 512]))
    records = []
    for n in sizes:
        mode = draw(st.sampled_from([0, 1]))
        if mode == 0:
            positions = list(range(n))
        else:
            positions = sorted(draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=min(n, 12))))
            if draw(st.integers(0, 9)) == 0:  # R37: the last index at n - 1 or just past it
                positions[-1] = max(positions[-2] + 1 if len(positions) > 1 else 0, n - 1) + draw(st.integers(0, 1))
        k = len(positions)
        b = draw(st.integers(0, min(30, n.bit_length() - 1)))
        unary, rem, prev = [], [], -1
        for i in positions:
            gap = i - prev - 1
            prev = i
            unary += [0] * (gap >> b) + [1]
            rem += [(gap >> (b - 1 - j)) & 1 for j in range(b)]
        nscales = -(-k // block)
        records.append({"n": n, "mode": mode, "k": k, "b": b, "unary": _pack_bits(unary), "rem": _pack_bits(rem),
                        "scales": [draw(st.sampled_from(SCALE_BITS[:5])) for _ in range(nscales)],
                        "q": [draw(st.integers(-127, 127)) for _ in range(k)]})
    header = {"format": 1, "block": block, "t": len(sizes)}
    ends: dict[str, int] = {}
    # mutations at the fields the rules name, at and around their limits
    for _ in range(draw(st.integers(0, 2))):
        target = draw(st.sampled_from(["format", "block", "t", "mode", "k", "b", "ulen", "unary", "rem", "padding",
                                       "scale", "scale", "q", "cut", "extra", "bound"]))
        rec = records[draw(st.integers(0, len(records) - 1))]
        n, k = rec["n"], rec["k"]
        if target == "format":
            header[target] = draw(st.sampled_from([0, 1, 2, 255]))
        elif target in ("block", "t"):
            header[target] = draw(st.sampled_from([0, 1, 2, len(sizes) + 1, 2**32 - 1]))
        elif target == "mode":
            rec["mode"] = draw(st.sampled_from([0, 1, 2, 255]))
        elif target == "k":
            rec["k_override"] = draw(st.sampled_from([0, 1, k - 1, k + 1, n, n + 1, 2**32 - 1]))
        elif target == "b":
            rec["b"] = draw(st.sampled_from([0, n.bit_length() - 1, n.bit_length(), 30, 31, 255]))
        elif target == "ulen":
            limit = -(-(k + ((n - k) >> rec["b"])) // 8)
            rec["ulen"] = draw(st.sampled_from([0, 1, limit - 1, limit, limit + 1, 2**32 - 1]))
        elif target in ("unary", "rem") and rec[target]:
            data = bytearray(rec[target])
            pos = draw(st.integers(0, 8 * len(data) - 1))
            data[pos // 8] ^= 0x80 >> (pos % 8)
            rec[target] = bytes(data) + (b"\x00" if draw(st.booleans()) else b"")
        elif target == "scale" and rec["scales"]:
            rec["scales"][draw(st.integers(0, len(rec["scales"]) - 1))] = draw(st.sampled_from(SCALE_BITS))
        elif target == "q" and rec["q"]:
            rec["q"][draw(st.integers(0, len(rec["q"]) - 1))] = draw(st.sampled_from([-128, -127, 127]))
        elif target == "padding" and (rec["k"] * rec["b"]) % 8:  # R36: one padding bit of rem set
            rem = bytearray(rec["rem"])
            rem[-1] |= 1 << draw(st.integers(0, 7 - (rec["k"] * rec["b"]) % 8))
            rec["rem"] = bytes(rem)
        elif target in ("cut", "extra"):
            ends[target] = draw(st.integers(0, 40))
        elif target == "bound":  # R26: filled to the size bound or one past it
            ends["bound"] = draw(st.integers(0, 1))
    parts = [struct.pack("<BII", header["format"], header["block"], header["t"])]
    for rec in records:
        parts.append(bytes((rec["mode"],)))
        if rec["mode"] == 1 or (rec["mode"] not in (0, 1)):
            parts.append(struct.pack("<IBI", rec.get("k_override", rec["k"]), min(rec["b"], 255),
                                     rec.get("ulen", len(rec["unary"]))) + rec["unary"] + rec["rem"])
        parts.append(struct.pack(f"<{len(rec['scales'])}I", *rec["scales"]) + struct.pack(f"<{rec['k']}b", *rec["q"]))
    payload = b"".join(parts)
    if "cut" in ends:
        payload = payload[:max(0, len(payload) - 1 - ends["cut"])]
    if "extra" in ends:
        payload += b"\x00" * (1 + ends["extra"])
    if "bound" in ends:
        payload += b"\x00" * max(0, 9 + 16 * len(sizes) + 10 * sum(sizes) + ends["bound"] - len(payload))
    return sizes, payload


def _spec(sizes: list[int]) -> ParamSpec:
    return ParamSpec(tuple(f"t{i}" for i in range(len(sizes))), tuple((n,) for n in sizes), ("float32",) * len(sizes))


@SETTINGS
@given(topk_payloads())
def test_topk_decoder_agrees_with_the_spec_rules(case: tuple[list[int], bytes]) -> None:
    sizes, payload = case
    spec = _spec(sizes)
    expected, values = _outcome(check_topk, payload, sizes)
    got, sparse = _fedmq_outcome(decode_sparse, "topk-int8", payload, spec)
    assert got == expected, payload.hex()
    if expected is None:
        assert _same_bits(sparse.to_dense(), values)


@SETTINGS
@given(st.lists(st.integers(1, 20), min_size=1, max_size=3), st.data())
def test_none_decoder_agrees_with_the_spec_rules(sizes: list[int], data: st.DataObject) -> None:
    words = data.draw(st.lists(st.sampled_from(SCALE_BITS + [0x7F7FFFFF, 0xFF7FFFFF]), min_size=sum(sizes),
                               max_size=sum(sizes)))
    payload = struct.pack(f"<{len(words)}I", *words)
    payload = data.draw(st.sampled_from([payload, payload[:-1], payload + b"\x00", payload[:-4],
                                         payload + payload[:4]]))
    expected, values = _outcome(check_none, payload, sizes)
    got, sparse = _fedmq_outcome(decode_sparse, "none", payload, _spec(sizes))
    assert got == expected
    if expected is None:
        assert _same_bits(sparse.to_dense(), values)


# ---------------------------------------------------------------- generating envelopes and receipts

TINY = _spec([64])
TINY_PAYLOAD = (Path(__file__).resolve().parents[1] / "vectors" / "tiny-topk.bin").read_bytes()

FIELD_VALUES: dict[str, list[Any]] = {
    "v": [1, 2, 0, True, 1.0, "1", None],
    "type": ["update", "updates", "receipt", "", 1],
    "federation": ["demo", "", "f" * 64, "f" * 65, "demo\n", "a/b", 5],
    "device": ["pi-01", "d" * 64, "d" * 65, "pi-01\n", "", "é", None],
    "round": [0, INT_MAX, INT_MAX + 1, 2**64 - 1, -1, -(2**63), True, 1.0, "1"],
    "base_version": [0, INT_MAX, INT_MAX + 1, -1, False],
    "samples": [0, 800, INT_MAX + 1, -1, True, 0.0],
    "kind": ["delta", "gradient", "gradients", "Delta", None],
    "spec_hash": [TINY.hash, TINY.hash + "\n", TINY.hash.upper(), TINY.hash[:-1], "0" * 16, b"x"],
    "codec": ["topk-int8", "none", "zstd", ""],
    "metrics": [{}, {f"m{i}": 1.0 for i in range(64)}, {f"m{i}": 1 for i in range(65)}, {"loss\n": 1.0},
                {"a b": 1.0}, {"loss": True}, {"loss": float("nan")}, {"loss": float("inf")}, {"loss": "x"},
                {"m" * 64: 2**64 - 1}, {"m" * 65: 1.0}, [1.0]],
    "payload": [TINY_PAYLOAD, b"", b"\x00" * 256, b"\x00" * 665, b"\x00" * 666, "text", None],
}

RECEIPT_VALUES: dict[str, list[Any]] = {
    "v": [1, True, 1.0, 2],
    "type": ["receipt", "receipts", "update"],
    "device": ["pi-01", "", 1, None, b"pi"],
    "round": [0, -1, 2**64 - 1, 0.0, True, None],
    "transfer_id": ["00ff", "", 7],
    "status": ["accepted", "rejected", "late", None],
    "reason": ["", "late", 1, None],
}

# raw msgpack values placed under an unknown key: each at or just past a msgpack rule
RAW_VALUES = [b"\xc0", b"\xc1", b"\xc4\x00", b"\xc7\x00\x05", b"\xd4\x01\x00", b"\xd6\xff\x00\x00\x00\x00",
              b"\xa3\xed\x9f\xbf", b"\xa3\xed\xa0\x80", b"\xa2\xc3\x28", b"\xa1", b"\xc4\x05ab",
              msgpack.packb("s" * STR_MAX), msgpack.packb("s" * (STR_MAX + 1)),
              msgpack.packb([0] * ENTRIES_MAX), msgpack.packb([0] * (ENTRIES_MAX + 1)),
              msgpack.packb({str(i): 0 for i in range(ENTRIES_MAX + 1)}),
              b"\x91" * (DEPTH_MAX - 2) + b"\x90", b"\x91" * (DEPTH_MAX - 1) + b"\x90",
              msgpack.packb([[0] * 255] * 15), msgpack.packb([[0] * 255] * 16),
              b"\x81\xc4\x01k\x00", b"\x81\x01\x02", b"\x82\xa1k\x00\xa1k\x01", b"\xdc\x00\x01\xc1"]


def _p(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


@st.composite
def messages(draw: Any, values: dict[str, list[Any]]) -> bytes:
    body = {key: vals[0] for key, vals in values.items()}
    pairs = {key: _p(v) for key, v in body.items()}
    for _ in range(draw(st.integers(0, 2))):
        key = draw(st.sampled_from(sorted(values)))
        value = draw(st.sampled_from(values[key]))
        if value is None:
            pairs.pop(key, None)
        else:
            pairs[key] = _p(value)
    items = [(_p(k), v) for k, v in pairs.items()]
    for _ in range(draw(st.sampled_from([0, 0, 1, 2]))):
        kind = draw(st.sampled_from(["raw", "raw", "raw", "raw", "bin-key", "int-key", "duplicate", "pad"]))
        if kind == "raw":
            items.insert(draw(st.integers(0, len(items))), (_p("x"), draw(st.sampled_from(RAW_VALUES))))
        elif kind == "bin-key":
            items.append((_p(b"x"), _p(1)))
        elif kind == "int-key":
            items.append((_p(1), _p(1)))
        elif kind == "duplicate" and items:
            items.append(items[draw(st.integers(0, len(items) - 1))])
        else:  # around the R1 bounds (17,049 bytes for tiny, 65,536 for control messages)
            items.append((_p("pad"), _p("p" * draw(st.sampled_from([16000, STR_MAX])))))
    head = bytes((0x80 | len(items),)) if len(items) < 16 else b"\xde" + struct.pack(">H", len(items))
    data = head + b"".join(k + v for k, v in items)
    end = draw(st.sampled_from(["whole"] * 6 + ["cut", "trailing", "array"]))
    if end == "cut":
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif end == "trailing":
        data += draw(st.sampled_from([b"\x00", b"\xc1", b"\x90"]))
    elif end == "array":
        data = b"\x91" + data
    return data


@SETTINGS
@given(messages(FIELD_VALUES))
def test_envelope_decoder_agrees_with_the_spec_rules(data: bytes) -> None:
    expected, _ = _outcome(check_envelope, data, [64], TINY.hash)
    got, upd = _fedmq_outcome(decode_update, data, TINY)
    assert got == expected, data[:200].hex()
    if expected is None:
        assert upd.spec_hash == TINY.hash


@SETTINGS
@given(messages(RECEIPT_VALUES))
def test_control_decoder_agrees_with_the_spec_rules(data: bytes) -> None:
    expected, _ = _outcome(check_receipt, data)
    got, _ = _fedmq_outcome(Receipt.from_bytes, data)
    assert got == expected, data[:200].hex()


def test_the_checker_refuses_what_the_issue_found() -> None:
    # The departures reported against fedmq 0.1, each refused by both sides with the same rule.
    base = {"v": 1, "type": "update", "federation": "demo", "device": "pi-01", "round": 1, "base_version": 0,
            "samples": 1, "kind": "delta", "spec_hash": TINY.hash, "codec": "topk-int8", "payload": TINY_PAYLOAD}
    plus_one = bytes((0x80 | (len(base) + 1),)) + _p(base)[1:]  # the map with room for one more pair
    found = {
        "R16": _p({**base, "device": "pi-01\n"}),  # a trailing line feed in an id
        "R4": plus_one + _p("x") + b"\xc7\x00\x05",  # an ext of length 0
        "R6": plus_one + _p(b"x") + _p(1),  # a bin key at the top level
    }
    for rule, data in found.items():
        assert _outcome(check_envelope, data, [64], TINY.hash)[0] == ("WireError", rule)
        assert _fedmq_outcome(decode_update, data, TINY)[0] == ("WireError", rule)
    inf_scale = TINY_PAYLOAD[:-7] + struct.pack("<I", MAX_SCALE_BITS + 1) + TINY_PAYLOAD[-3:]
    assert _outcome(check_topk, inf_scale, [64])[0] == ("NonFiniteError", "R40")
    assert _fedmq_outcome(decode_sparse, "topk-int8", inf_scale, TINY)[0] == ("NonFiniteError", "R40")
