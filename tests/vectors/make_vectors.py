"""Generate the wire-format test vectors in this folder (docs/wire-format.md, "Test vectors").

Run from the project root: ``.venv/bin/python tests/vectors/make_vectors.py``. The output is
deterministic; tests/fedmq/test_vectors.py checks the stored files against the decoders and
regenerates them in a temporary folder to catch accidental format changes.

Files per case: ``<case>.bin`` (the encoded message), and for valid payloads and envelopes
``<case>.decoded.npy`` (float32, the expected decoded vector) and, for the cases fedmq's
encoder made (``"encoder": true``), ``<case>.input.npy`` (the vector that was encoded).
``manifest.json`` lists specs and cases.

Boundary cases (``R<n>-inside``, ``R<n>-outside``, variants ``R<n>-outside-<what>``): for
every refusal rule of docs/wire-format.md ("Refusal rules"), a message just within the
rule's limit and one just past it, built byte by byte with the plain writers below (not
with fedmq's decoders), expected decoded vectors computed here as ``float32(q) * scale``.
"""

from __future__ import annotations

import io
import json
import struct
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from fedmq import PROTOCOL_VERSION
from fedmq.codecs import CodecSpec, decode, encode
from fedmq.codecs.topk_int8 import TopKParams
from fedmq.wire.envelope import ClientUpdate, encode_update
from fedmq.model.params import ParamSpec

#: Rules the first, hand-picked invalid cases break.
_LEGACY_RULES = {"bad-nan-scale": "R38", "bad-index-out-of-range": "R37", "bad-truncated": "R27",
                 "bad-int8-minus-128": "R41", "bad-none-length": "R43", "bad-envelope-version": "R14",
                 "bad-envelope-spec-hash": "R22", "bad-envelope-round": "R17"}
# The spec's limits (docs/wire-format.md), written out here rather than imported, so that a
# change on either side shows.
_STR_MAX, _ENTRIES_MAX, _DEPTH_MAX, _OBJECTS_MAX = 16384, 256, 8, 4096
_ENVELOPE_OVERHEAD, _CONTROL_MAX = 16384, 65536
_MAX_SCALE_BITS = 0x7C010203

SPECS = {
    "tiny": ParamSpec(("w",), ((64,),), ("float32",)),
    "small": ParamSpec(("conv.weight", "conv.bias", "fc.weight", "fc.bias"),
                       ((8, 1, 5, 5), (8,), (10, 300), (10,)), ("float32",) * 4),
}


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _tiny_input() -> np.ndarray:
    x = np.linspace(-0.01, 0.01, 64, dtype=np.float32)
    x[5], x[20], x[63] = 1.0, -0.6, 0.25
    return x


def _small_input() -> np.ndarray:
    return np.random.default_rng(1).standard_normal(SPECS["small"].size).astype(np.float32)


def build() -> dict[str, bytes]:
    """All vector files, name -> content."""
    files: dict[str, bytes] = {}
    cases: list[dict[str, Any]] = []

    def valid(name: str, spec: str, x: np.ndarray, cfg: CodecSpec, seed: int | None = None) -> bytes:
        rng = None if seed is None else np.random.default_rng(seed)
        payload = encode(x, SPECS[spec], cfg, rng)
        files[f"{name}.bin"] = payload
        files[f"{name}.input.npy"] = _npy(x)
        files[f"{name}.decoded.npy"] = _npy(decode(cfg.name, payload, SPECS[spec]))
        cases.append({"name": name, "kind": "payload", "spec": spec, "codec": cfg.name, "valid": True,
                      # topk-int8's parameters for every case, those of a none case at
                                      # their defaults, as the index has always recorded them.
                      "encoder": True, "config": {**TopKParams().as_dict(), **cfg.params.as_dict()},
                      "rng_seed": seed})
        return payload

    def invalid(name: str, spec: str, kind: str, codec: str, data: bytes, error: str, why: str) -> None:
        files[f"{name}.bin"] = data
        cases.append({"name": name, "kind": kind, "spec": spec, "codec": codec, "valid": False,
                      "error": error, "why": why})

    # Per-tensor selection (these vectors predate global selection and keep their bytes).
    tiny = valid("tiny-topk", "tiny", _tiny_input(),
                 CodecSpec.of(density=0.05, block_size=512, dense_below=0, topk="per-tensor"))
    small = valid("small-topk", "small", _small_input(),
                  CodecSpec.of(density=0.02, block_size=16, dense_below=64, topk="per-tensor"))
    valid("small-dense-fallback", "small", _small_input(),
          CodecSpec.of(density=0.9, block_size=16, dense_below=64, topk="per-tensor"))
    valid("small-stochastic", "small", _small_input(),
          CodecSpec.of(density=0.1, block_size=32, dense_below=64, stochastic=True, topk="per-tensor"), seed=7)
    # The default, global selection: the same budget spent across the sparse tensors.
    valid("small-topk-global", "small", _small_input(), CodecSpec.of(density=0.02, block_size=16, dense_below=64))
    valid("small-none", "small", _small_input(), CodecSpec.of(name="none"))

    update = ClientUpdate(federation="demo", device="pi-01", round=12, base_version=11, samples=800,
                          kind="delta", spec_hash=SPECS["small"].hash, codec="topk-int8", payload=small,
                          metrics={"train_loss": 0.5, "train_seconds": 2.25})
    files["small-envelope.bin"] = encode_update(update)
    files["small-envelope.decoded.npy"] = files["small-topk.decoded.npy"]
    cases.append({"name": "small-envelope", "kind": "envelope", "spec": "small", "codec": "topk-int8",
                  "valid": True, "encoder": True,
                  "fields": {k: v for k, v in update.__dict__.items() if k not in ("payload", "control")}})

    # Invalid messages: a decoder must refuse each one with the named error.
    scale_at = 9 + 1 + 9 + (len(tiny) - 9 - 1 - 9 - 4 - 3)  # first scale of the one sparse record
    nan_scale = bytearray(tiny)
    nan_scale[scale_at:scale_at + 4] = struct.pack("<f", float("nan"))
    invalid("bad-nan-scale", "tiny", "payload", "topk-int8", bytes(nan_scale), "NonFiniteError",
            "the scale of the only block is NaN")
    # indices 0 and 64 (gaps 0 and 63, Rice b = 3): unary 1 00000001, remainders 000 111
    out_of_range = (struct.pack("<BII", 1, 512, 1) + b"\x01" + struct.pack("<IBI", 2, 3, 2)
                    + b"\x80\x80" + b"\x1c" + struct.pack("<f", 1.0) + b"\x01\x01")
    invalid("bad-index-out-of-range", "tiny", "payload", "topk-int8", out_of_range, "CodecError",
            "kept values at indices 0 and 64 of a 64-element tensor")
    invalid("bad-truncated", "small", "payload", "topk-int8", small[:-1], "CodecError",
            "the last value byte is missing")
    invalid("bad-int8-minus-128", "tiny", "payload", "topk-int8", tiny[:-1] + b"\x80", "CodecError",
            "an int8 value of -128 (outside the symmetric range)")
    invalid("bad-none-length", "small", "payload", "none", encode(_small_input(), SPECS["small"],
            CodecSpec.of(name="none"))[:-4], "CodecError", "a none payload one float short")
    # Scaffold: the same envelope with the control-variate change as a second payload.
    control = encode(-0.5 * _small_input(), SPECS["small"],
                     CodecSpec.of(density=0.02, block_size=16, dense_below=64, topk="per-tensor"))
    with_control = replace(update, control=control)
    files["small-envelope-control.bin"] = encode_update(with_control)
    files["small-envelope-control.decoded.npy"] = files["small-topk.decoded.npy"]
    files["small-envelope-control.control.npy"] = _npy(decode("topk-int8", control, SPECS["small"]))
    cases.append({"name": "small-envelope-control", "kind": "envelope", "spec": "small", "codec": "topk-int8",
                  "valid": True, "encoder": True, "control": True,
                  "fields": {k: v for k, v in update.__dict__.items() if k not in ("payload", "control")}})
    envelope = msgpack.unpackb(files["small-envelope.bin"], raw=False)
    invalid("bad-envelope-control-empty", "small", "envelope", "topk-int8",
            msgpack.packb({**envelope, "control": b""}, use_bin_type=True), "WireError",
            "the optional control payload present but empty")
    cases[-1]["rule"] = "R21"
    invalid("bad-envelope-version", "small", "envelope", "topk-int8",
            msgpack.packb({**envelope, "v": PROTOCOL_VERSION + 98}, use_bin_type=True), "WireError",
            "unknown protocol version")
    invalid("bad-envelope-spec-hash", "small", "envelope", "topk-int8",
            msgpack.packb({**envelope, "spec_hash": SPECS["tiny"].hash}, use_bin_type=True), "SpecMismatchError",
            "made for another ParamSpec")
    invalid("bad-envelope-round", "small", "envelope", "topk-int8",
            msgpack.packb({**envelope, "round": -1}, use_bin_type=True), "WireError", "negative round")

    _boundaries(cases, files, tiny, files["tiny-topk.decoded.npy"])
    for case in cases:
        if case["name"] in _LEGACY_RULES:
            case["rule"] = _LEGACY_RULES[case["name"]]

    manifest = {"protocol_version": PROTOCOL_VERSION, "specs": {k: s.to_dict() for k, s in SPECS.items()},
                "cases": cases}
    files["manifest.json"] = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()
    return files


# ---------------------------------------------------------------- boundary cases (plain writers)

def _p(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _map(pairs: list[tuple[bytes, bytes]]) -> bytes:
    """A msgpack map from already-packed keys and values (so keys may repeat or be any type)."""
    n = len(pairs)
    head = bytes((0x80 | n,)) if n < 16 else b"\xde" + struct.pack(">H", n)
    return head + b"".join(k + v for k, v in pairs)


def _pairs(body: dict[str, Any]) -> list[tuple[bytes, bytes]]:
    return [(_p(k), _p(v)) for k, v in body.items()]


def _padded(pairs: list[tuple[bytes, bytes]], total: int) -> bytes:
    """``pairs`` plus unknown keys ``x0``, ``x1``, ... holding str values, exactly ``total`` bytes."""
    extra = total - len(_map(pairs))
    per_pad = 3 + 3 + _STR_MAX  # fixstr key "xN", str16 header, body
    count = -(-extra // per_pad)
    last = extra - (count - 1) * per_pad - 6
    assert 256 <= last <= _STR_MAX, last  # keeps the str16 header of every pad
    pads = [(_p(f"x{i}"), _p("p" * (_STR_MAX if i < count - 1 else last))) for i in range(count)]
    data = _map(pairs + pads)
    assert len(data) == total
    return data


def _objects(count: int) -> list[Any]:
    """A nested list of exactly ``count`` msgpack objects (itself included), <= 256 entries each."""
    rest, inner = count - 1, []
    while rest:
        m = min(rest, _ENTRIES_MAX)
        inner.append([0] * (m - 1))
        rest -= m
    assert len(inner) <= _ENTRIES_MAX
    return inner


def _count(obj: Any) -> int:
    if isinstance(obj, dict):
        return 1 + sum(1 + _count(v) for v in obj.values())
    if isinstance(obj, list):
        return 1 + sum(_count(v) for v in obj)
    return 1


def _nested(levels: int) -> Any:
    out: list[Any] = []
    for _ in range(levels - 1):
        out = [out]
    return out


def _f32(bits: int) -> np.float32:
    return np.frombuffer(struct.pack("<I", bits), dtype="<f4")[0]


def _bits_to_bytes(bits: list[int]) -> bytes:
    bits = bits + [0] * (-len(bits) % 8)
    return bytes(int("".join(map(str, bits[i:i + 8])), 2) for i in range(0, len(bits), 8))


def _rice(indices: list[int], b: int) -> tuple[bytes, bytes]:
    unary: list[int] = []
    rem: list[int] = []
    prev = -1
    for i in indices:
        gap = i - prev - 1
        prev = i
        unary += [0] * (gap >> b) + [1]
        rem += [(gap >> (b - 1 - j)) & 1 for j in range(b)]
    return _bits_to_bytes(unary), _bits_to_bytes(rem)


def _sparse(indices: list[int], b: int, scale_bits: list[int], q: list[int], *, k: int | None = None,
            ulen: int | None = None, unary: bytes | None = None, rem: bytes | None = None) -> bytes:
    """One mode-1 record, written from the layout; the keyword arguments override fields."""
    u, r = _rice(indices, b)
    u = u if unary is None else unary
    r = r if rem is None else rem
    return (b"\x01" + struct.pack("<IBI", len(indices) if k is None else k, b, len(u) if ulen is None else ulen)
            + u + r + struct.pack(f"<{len(scale_bits)}I", *scale_bits) + struct.pack(f"<{len(q)}b", *q))


def _topk(records: bytes, block: int = 512, ntensors: int = 1, fmt: int = 1) -> bytes:
    return struct.pack("<BII", fmt, block, ntensors) + records


def _expected(n: int, indices: list[int], scale_bits: list[int], q: list[int], block: int = 512) -> np.ndarray:
    out = np.zeros(n, dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):  # outside cases: only their bytes are kept
        for m, (i, v) in enumerate(zip(indices, q)):
            out[i] = np.float32(v) * _f32(scale_bits[m // block])
    return out


_ONE = 0x3C010204  # float32(1 / 127)


def _boundaries(cases: list[dict[str, Any]], files: dict[str, bytes], tiny_payload: bytes,
                tiny_decoded: bytes) -> None:
    """Add an inside and an outside case (and some variants) for every rule R1-R44."""
    tiny = SPECS["tiny"]

    def case(name: str, kind: str, data: bytes, rule: str, *, spec: str = "tiny", codec: str = "topk-int8",
             error: str | None = None, why: str, decoded: bytes | np.ndarray | None = None,
             fields: dict[str, Any] | None = None, message: str | None = None) -> None:
        files[f"{name}.bin"] = data
        entry: dict[str, Any] = {"name": name, "kind": kind, "spec": spec, "codec": codec, "rule": rule,
                                 "boundary": "outside" if "-outside" in name else "inside",
                                 "valid": error is None, "why": why}
        if error is not None:
            entry["error"] = error
        if decoded is not None:
            files[f"{name}.decoded.npy"] = decoded if isinstance(decoded, bytes) else _npy(decoded)
        if fields is not None:
            entry["fields"] = fields
        if message is not None:
            entry["message"] = message
        cases.append(entry)

    # ---- client update envelope (R1-R23), around the tiny-topk payload
    body = {"v": PROTOCOL_VERSION, "type": "update", "federation": "demo", "device": "pi-01", "round": 12,
            "base_version": 11, "samples": 800, "kind": "delta", "spec_hash": tiny.hash, "codec": "topk-int8",
            "metrics": {"train_loss": 0.5}, "payload": tiny_payload}
    fields = {k: v for k, v in body.items() if k not in ("v", "type", "payload")}

    def env(rule: str, inside: bytes, outside: bytes, why_in: str, why_out: str, error: str = "WireError",
            inside_fields: dict[str, Any] | None = None, inside_decoded: bytes | None = None) -> None:
        case(f"{rule}-inside", "envelope", inside, rule, why=why_in, decoded=inside_decoded or tiny_decoded,
             fields=inside_fields or fields)
        case(f"{rule}-outside", "envelope", outside, rule, error=error, why=why_out)

    def with_(**over: Any) -> dict[str, Any]:
        return {**body, **over}

    base = _pairs(body)
    limit = max(4 * tiny.size, 9 + 16 * len(tiny.sizes) + 10 * tiny.size) + _ENVELOPE_OVERHEAD
    env("R1", _padded(base, limit), _padded(base, limit + 1), f"exactly {limit} bytes (the bound for tiny)",
        f"{limit + 1} bytes, one over the bound")
    whole = _map(base)
    env("R2", whole, whole[:-1], "a whole envelope", "the payload's last byte is missing")
    env("R3", _map(base + [(_p("x"), b"\xc0")]), _map(base + [(_p("x"), b"\xc1")]),
        "an unknown key holding nil (0xc0)", "an unknown key holding the reserved byte 0xc1")
    env("R4", _map(base + [(_p("x"), b"\xc4\x00")]), _map(base + [(_p("x"), b"\xc7\x00\x05")]),
        "an unknown key holding a zero-length bin", "an unknown key holding a zero-length ext (type 5)")
    case("R4-outside-timestamp", "envelope", _map(base + [(_p("x"), b"\xd6\xff" + struct.pack(">I", 0))]), "R4",
         error="WireError", why="an unknown key holding the timestamp ext (-1), which msgpack-python decodes")
    env("R5", whole, b"\x91" + whole, "the envelope as a map", "the same map inside a one-element array")
    env("R6", _map(base + [(_p("x"), _p(1))]), _map(base + [(_p(b"x"), _p(1))]),
        "an unknown str key", "the same key as bin, at the top level")
    case("R6-outside-nested", "envelope", _map(_pairs(with_(metrics={})) [:-2] + [
        (_p("metrics"), _map([(_p(b"loss"), _p(0.5))])), (_p("payload"), _p(tiny_payload))]), "R6",
        error="WireError", why="a bin key inside metrics")
    spare = _OBJECTS_MAX - _count(body) - 1  # the key "x" is one object
    env("R7", _map(base + [(_p("x"), _p(_objects(spare)))]), _map(base + [(_p("x"), _p(_objects(spare + 1)))]),
        f"{_OBJECTS_MAX} msgpack objects", f"{_OBJECTS_MAX + 1} msgpack objects")
    env("R8", _map(base + [(_p("x"), _p(_nested(_DEPTH_MAX - 1)))]),
        _map(base + [(_p("x"), _p(_nested(_DEPTH_MAX)))]),
        f"arrays nested to depth {_DEPTH_MAX} (the map is depth 1)", f"an array at depth {_DEPTH_MAX + 1}")
    env("R9", _map(base + [(_p("x"), _p("s" * _STR_MAX))]), _map(base + [(_p("x"), _p("s" * (_STR_MAX + 1)))]),
        f"a str of {_STR_MAX} bytes", f"a str of {_STR_MAX + 1} bytes")
    env("R10", _map(base + [(_p("x"), _p([0] * _ENTRIES_MAX))]),
        _map(base + [(_p("x"), _p([0] * (_ENTRIES_MAX + 1)))]),
        f"an array of {_ENTRIES_MAX} entries", f"an array of {_ENTRIES_MAX + 1} entries")
    env("R11", _map(base + [(_p("x"), b"\xa3\xed\x9f\xbf")]), _map(base + [(_p("x"), b"\xa3\xed\xa0\x80")]),
        "a str holding U+D7FF, the code point below the surrogates", "a str holding the surrogate U+D800")
    env("R12", _map(base + [(_p("rounds"), _p(12))]), _map(base + [(_p("round"), _p(12))]),
        "an unknown key 'rounds'", "the key 'round' twice, with equal values")
    env("R13", whole, whole + b"\xc0", "nothing after the map", "one byte (nil) after the map")
    env("R14", whole, _map(_pairs(with_(v=1.0))), "v = 1", "v = 1.0, a float")
    case("R14-outside-bool", "envelope", _map(_pairs(with_(v=True))), "R14", error="WireError", why="v = true")
    env("R15", whole, _map(_pairs(with_(type="updates"))), "type 'update'", "type 'updates'")
    env("R16", _map(_pairs(with_(device="d" * 64))), _map(_pairs(with_(device="d" * 65))),
        "a 64-character device id", "a 65-character device id", inside_fields={**fields, "device": "d" * 64})
    case("R16-outside-newline", "envelope", _map(_pairs(with_(device="pi-01\n"))), "R16", error="WireError",
         why="a device id with a trailing line feed")
    env("R17", _map(_pairs(with_(round=2**63 - 1))), _map(_pairs(with_(round=2**63))),
        "round 2**63 - 1", "round 2**63 (a uint64)", inside_fields={**fields, "round": 2**63 - 1})
    case("R17-outside-bool", "envelope", _map(_pairs(with_(samples=True))), "R17", error="WireError",
         why="samples = true")
    env("R18", _map(_pairs(with_(kind="gradient"))), _map(_pairs(with_(kind="gradients"))),
        "kind 'gradient'", "kind 'gradients'", inside_fields={**fields, "kind": "gradient"})
    env("R19", whole, _map(_pairs(with_(spec_hash=tiny.hash + "\n"))), "the tiny ParamSpec's hash",
        "the same hash with a trailing line feed")
    metrics = {f"m{i}": float(i) for i in range(64)}
    env("R20", _map(_pairs(with_(metrics=metrics))), _map(_pairs(with_(metrics={**metrics, "m64": 64.0}))),
        "64 metrics", "65 metrics", inside_fields={**fields, "metrics": metrics})
    case("R20-outside-newline", "envelope", _map(_pairs(with_(metrics={"loss\n": 0.5}))), "R20", error="WireError",
         why="a metric name with a trailing line feed")
    env("R21", whole, _map(_pairs(with_(payload=""))), "payload as bin", "payload as an empty str")
    env("R22", whole, _map(_pairs(with_(spec_hash=SPECS["small"].hash))), "the receiver's ParamSpec hash",
        "a well-formed hash of another ParamSpec", error="SpecMismatchError")
    dense = np.linspace(-2, 2, tiny.size, dtype=np.float32)
    env("R23", _map(_pairs(with_(codec="none", payload=dense.astype("<f4").tobytes()))),
        _map(_pairs(with_(codec="none", payload=dense.astype("<f4").tobytes() + b"\x00" * 4))),
        "a none payload of 4 * size bytes", "a none payload one float too long", error="CodecError",
        inside_fields={**fields, "codec": "none"}, inside_decoded=_npy(dense))

    # ---- control messages (R1, R14, R15, R24, R25; the msgpack rules are shared with the envelope)
    receipt = {"v": PROTOCOL_VERSION, "type": "receipt", "device": "pi-01", "round": 0, "transfer_id": "00ff",
               "status": "accepted"}
    r_fields = {"device": "pi-01", "round": 0, "transfer_id": "00ff", "status": "accepted", "reason": ""}

    def ctl(rule: str, inside: bytes, outside: bytes, why_in: str, why_out: str,
            inside_fields: dict[str, Any] | None = None) -> None:
        case(f"{rule}-control-inside", "control", inside, rule, codec="", why=why_in,
             fields=inside_fields or r_fields, message="receipt")
        case(f"{rule}-control-outside", "control", outside, rule, codec="", error="WireError", why=why_out,
             message="receipt")

    r_pairs = _pairs(receipt)
    ctl("R1", _padded(r_pairs, _CONTROL_MAX), _padded(r_pairs, _CONTROL_MAX + 1), f"a receipt of {_CONTROL_MAX} bytes",
        f"a receipt of {_CONTROL_MAX + 1} bytes")
    ctl("R4", _map(r_pairs + [(_p("x"), b"\xc4\x00")]), _map(r_pairs + [(_p("x"), b"\xc7\x00\x05")]),
        "an unknown key holding a zero-length bin", "an unknown key holding a zero-length ext")
    ctl("R6", _map(r_pairs + [(_p("x"), _p(1))]), _map(r_pairs + [(_p(b"x"), _p(1))]), "an unknown str key",
        "a bin key")
    ctl("R12", _map(r_pairs + [(_p("rounds"), _p(0))]), _map(r_pairs + [(_p("round"), _p(0))]),
        "an unknown key 'rounds'", "the key 'round' twice")
    ctl("R14", _map(r_pairs), _map(_pairs({**receipt, "v": True})), "v = 1", "v = true (equal to 1 in Python)")
    ctl("R15", _map(r_pairs), _map(_pairs({**receipt, "type": "receipts"})), "type 'receipt'", "type 'receipts'")
    ctl("R24", _map(r_pairs), _map(_pairs({**receipt, "round": 0.0})), "round 0", "round 0.0, a float")
    ctl("R25", _map(r_pairs), _map(_pairs({**receipt, "round": -1})), "round 0", "round -1")
    task = {"v": PROTOCOL_VERSION, "type": "task", "federation": "demo", "device": "pi-01", "round": 3,
            "model_version": 2, "spec_hash": tiny.hash, "deadline": 100.5, "plan": {"density": 1.0}}
    t_fields = {"federation": "demo", "device": "pi-01", "round": 3, "model_version": 2, "spec_hash": tiny.hash,
                "deadline": 100.5, "plan": {"density": 1.0}}
    case("R25-control-inside-plan", "control", _map(_pairs(task)), "R25", codec="", why="plan density 1.0",
         fields=t_fields, message="task")
    above_one = float(np.nextafter(1.0, 2.0))
    case("R25-control-outside-plan", "control", _map(_pairs({**task, "plan": {"density": above_one}})),
         "R25", codec="", error="WireError", why="plan density the next float64 above 1.0", message="task")

    # ---- codec topk-int8 (R26-R42), tensor of 64 elements, B = 512 unless said
    def pay(rule: str, inside: bytes, outside: bytes, why_in: str, why_out: str, decoded: np.ndarray | bytes | None,
            error: str = "CodecError", suffix: str = "", inside_error: tuple[str, str] | None = None) -> None:
        if inside_error is None:
            case(f"{rule}-inside{suffix}", "payload", inside, rule, why=why_in, decoded=decoded)
        else:  # the rule's limit cannot be met by a valid payload: another rule refuses the inside case
            case(f"{rule}-inside{suffix}", "payload", inside, rule, why=why_in, error=inside_error[0])
            cases[-1]["refused_by"] = inside_error[1]
        case(f"{rule}-outside{suffix}", "payload", outside, rule, error=error, why=why_out)

    def one(scale_bits: int = _ONE, q: int = 127, index: int = 5) -> tuple[bytes, np.ndarray]:
        return _topk(_sparse([index], 0, [scale_bits], [q])), _expected(64, [index], [scale_bits], [q])

    bound = 9 + 16 * len(tiny.sizes) + 10 * tiny.size
    pay("R26", tiny_payload + b"\x00" * (bound - len(tiny_payload)),
        tiny_payload + b"\x00" * (bound + 1 - len(tiny_payload)),
        f"{bound} bytes (the bound; the bound is loose, so the zero fill is then refused by R42)",
        f"{bound + 1} bytes", None, inside_error=("CodecError", "R42"))
    pay("R27", tiny_payload, tiny_payload[:-1], "tiny-topk whole", "tiny-topk less its last byte", tiny_decoded)
    ok, ok_dec = one()
    pay("R28", ok, _topk(_sparse([5], 0, [_ONE], [127]), fmt=2), "format 1", "format 2", ok_dec)
    in_b1 = _topk(_sparse([1, 2], 0, [_ONE, 0x3F800000], [127, -3]), block=1)
    pay("R29", in_b1, _topk(_sparse([1, 2], 0, [_ONE, 0x3F800000], [127, -3]), block=0), "B = 1", "B = 0",
        _expected(64, [1, 2], [_ONE, 0x3F800000], [127, -3], block=1))
    pay("R30", ok, _topk(_sparse([5], 0, [_ONE], [127]), ntensors=2), "T = 1", "T = 2", ok_dec)
    dense_q = [(i % 255) - 127 for i in range(64)]
    dense = _topk(b"\x00" + struct.pack("<I", _ONE) + struct.pack("<64b", *dense_q))
    pay("R31", dense, _topk(b"\x02" + dense[10:]), "mode 0 (dense)", "mode 2",
        _expected(64, list(range(64)), [_ONE], dense_q))
    every = list(range(64))
    pay("R32", _topk(_sparse(every, 0, [_ONE], [1] * 64)), _topk(_sparse(every, 0, [_ONE], [1] * 64, k=65)),
        "k = n = 64", "k = 65", _expected(64, every, [_ONE], [1] * 64))
    case("R32-outside-zero", "payload", _topk(_sparse([5], 0, [_ONE], [1], k=0)), "R32", error="CodecError",
         why="k = 0")
    pay("R33", _topk(_sparse([40, 63], 6, [_ONE], [5, -5])), _topk(_sparse([40, 63], 7, [_ONE], [5, -5])),
        "b = 6 (2^6 = n)", "b = 7 (2^7 > n)", _expected(64, [40, 63], [_ONE], [5, -5]))
    last, last_dec = one(index=63)  # gap 63 with b = 0: 64 unary bits, the most U = 8 allows
    pay("R34", last, _topk(_sparse([63], 0, [_ONE], [127], ulen=9, unary=b"\x00" * 7 + b"\x01\x00")),
        "U = 8 = ceil((k + ((n - k) >> b)) / 8)", "U = 9", last_dec)
    case("R34-outside-zero", "payload", _topk(_sparse([5], 0, [_ONE], [1], ulen=0, unary=b"")), "R34",
         error="CodecError", why="U = 0")
    pay("R35", _topk(_sparse([8], 0, [_ONE], [9])), _topk(_sparse([0], 0, [_ONE], [9], unary=b"\x80\x00")),
        "index 8: unary 00 80, the one-bit in the last byte", "index 0 with a zero byte after its unary code",
        _expected(64, [8], [_ONE], [9]))
    case("R35-outside-count", "payload", _topk(_sparse([1, 2], 0, [_ONE], [1, 1], k=1)), "R35",
         error="CodecError", why="k = 1 but two one-bits in the unary stream")
    rem_ok = _rice([5, 20, 63], 4)[1]
    pay("R36", _topk(_sparse([5, 20, 63], 4, [_ONE], [127, -76, 32])),
        _topk(_sparse([5, 20, 63], 4, [_ONE], [127, -76, 32], rem=rem_ok[:-1] + bytes((rem_ok[-1] | 1,)))),
        "zero padding after 12 remainder bits", "the last padding bit set", _expected(64, [5, 20, 63], [_ONE],
                                                                                    [127, -76, 32]))
    pay("R37", _topk(_sparse([0, 63], 3, [_ONE], [1, 1])), _topk(_sparse([0, 64], 3, [_ONE], [1, 1])),
        "indices 0 and 63", "indices 0 and 64 (n = 64)", _expected(64, [0, 63], [_ONE], [1, 1]))
    top, top_dec = one(_MAX_SCALE_BITS, -127)
    pay("R38", top, one(0x7F800000)[0], "the largest allowed scale, 0x7c010203, times -127",
        "a scale of +inf (0x7f800000)", top_dec, error="NonFiniteError")
    for name, bits in (("nan", 0x7FC00000), ("snan", 0x7F800001), ("minus-inf", 0xFF800000)):
        case(f"R38-outside-{name}", "payload", one(bits)[0], "R38", error="NonFiniteError",
             why=f"a scale of {name} (0x{bits:08x})")
    zero, zero_dec = one(0x80000000)
    pay("R39", zero, one(0x80000001)[0], "a scale of -0.0 (0x80000000)",
        "the negative float32 nearest 0 (0x80000001)", zero_dec)
    pay("R40", top, one(_MAX_SCALE_BITS + 1, -127)[0], "scale 0x7c010203: 127 * s = 3.4028233e38",
        "scale 0x7c010204 (float32(FLT_MAX / 127)): 127 * s = inf", top_dec, error="NonFiniteError")
    case("R40-outside-dense", "payload",
         _topk(b"\x00" + struct.pack("<I", _MAX_SCALE_BITS + 1) + struct.pack("<64b", *dense_q)), "R40",
         error="NonFiniteError", why="a mode-0 record with scale 0x7c010204")
    low, low_dec = one(q=-127)
    pay("R41", low, one(q=-128)[0], "q = -127", "q = -128", low_dec)
    pay("R42", ok, ok + b"\x00", "no trailing bytes", "one trailing zero byte", ok_dec)

    # ---- codec none (R43, R44), small ParamSpec-free: the tiny one
    big = np.full(tiny.size, np.finfo(np.float32).max, dtype=np.float32)
    big[1::2] *= -1
    raw = big.astype("<f4").tobytes()
    case("R43-inside", "payload", raw, "R43", codec="none", why="exactly 4 * size bytes", decoded=big)
    case("R43-outside", "payload", raw[:-1], "R43", codec="none", error="CodecError", why="4 * size - 1 bytes")
    case("R43-outside-long", "payload", raw + b"\x00", "R43", codec="none", error="CodecError",
         why="4 * size + 1 bytes")
    case("R44-inside", "payload", raw, "R44", codec="none", why="+-FLT_MAX (0x7f7fffff) everywhere", decoded=big)
    case("R44-outside", "payload", raw[:-4] + struct.pack("<I", 0x7F800000), "R44", codec="none",
         error="NonFiniteError", why="the last value +inf (0x7f800000)")

def main(out: Path) -> None:
    for name, content in build().items():
        (out / name).write_bytes(content)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent)
