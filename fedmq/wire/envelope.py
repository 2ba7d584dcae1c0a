"""The client update envelope: one msgpack map around a codec payload.

Byte layout in docs/wire-format.md, "Client update envelope". Decoding is strict and follows
the spec's numbered refusal rules R1-R23 in their order: the size of the message is bounded
by the ParamSpec before parsing, the msgpack subset is read by :mod:`fedmq.wire.strict_msgpack`,
every field's type and range is checked in the table's order, the spec hash must match and
the payload must fit the codec's bound. Everything malformed raises
:class:`~fedmq.errors.WireError` (or a subclass) naming the rule, nothing else.
The payload itself is validated by :func:`fedmq.codecs.decode_sparse` / :func:`fedmq.codecs.decode`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import msgpack

from fedmq import PROTOCOL_VERSION
from fedmq.codecs import codec_names, max_payload_bytes
from fedmq.errors import CodecError, SpecMismatchError, WireError
from fedmq.model.params import ParamSpec
from fedmq.wire.strict_msgpack import unpack_map

MESSAGE_TYPE = "update"
UPDATE_KINDS = ("delta", "gradient")
#: Bytes allowed for everything in the envelope but the payload.
MAX_ENVELOPE_OVERHEAD = 16 * 1024
MAX_METRICS = 64
# Used with fullmatch: "$" would also match before a trailing line feed.
_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_METRIC_KEY = re.compile(r"[A-Za-z0-9_./-]{1,64}")
_HASH = re.compile(r"[0-9a-f]{16}")
_INT_MAX = 2**63 - 1


@dataclass(frozen=True)
class ClientUpdate:
    """One client update as sent by a device.

    Fields:
        federation, device: ids (1-64 chars from ``[A-Za-z0-9_.-]``).
        round: the round this update answers (>= 0).
        base_version: global model version the device trained from (>= 0).
        samples: number of local training samples (>= 0), the aggregation weight.
        kind: ``"delta"`` (w_local - w_global) or ``"gradient"`` (mean minibatch gradient).
        spec_hash: :attr:`fedmq.model.params.ParamSpec.hash` of the model.
        codec: ``"topk-int8"`` or ``"none"``.
        payload: the codec payload (bytes).
        metrics: name -> finite float (e.g. ``train_loss``), at most 64 entries.
        control: Scaffold's control-variate change ``delta c_i``, a second payload of the same
            codec (:mod:`fedmq.fl.scaffold`); ``b""``: none (the key is left out of the message).
    """

    federation: str
    device: str
    round: int
    base_version: int
    samples: int
    kind: str
    spec_hash: str
    codec: str
    payload: bytes
    metrics: dict[str, float] = field(default_factory=dict)
    control: bytes = b""


def _refuse(rule: str, what: str) -> WireError:
    return WireError(f"update: {what} (rule {rule})")


def _int(obj: dict[str, Any], key: str) -> int:
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _refuse("R17", f"field {key!r} must be an int, got {type(value).__name__}")
    if not 0 <= value <= _INT_MAX:
        raise _refuse("R17", f"field {key!r} must be in 0..2**63-1, got {value}")
    return value


def _str(obj: dict[str, Any], key: str, rule: str, pattern: re.Pattern[str] | None = None,
         choices: tuple[str, ...] | None = None) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise _refuse(rule, f"field {key!r} must be a str, got {type(value).__name__}")
    if pattern is not None and not pattern.fullmatch(value):
        raise _refuse(rule, f"field {key!r} has an invalid value {value[:80]!r}")
    if choices is not None and value not in choices:
        raise _refuse(rule, f"field {key!r} must be one of {choices}, got {value[:80]!r}")
    return value


def _metrics(raw: Any) -> dict[str, float]:
    if not isinstance(raw, dict):
        raise _refuse("R20", f"field 'metrics' must be a map, got {type(raw).__name__}")
    if len(raw) > MAX_METRICS:
        raise _refuse("R20", f"{len(raw)} metrics, at most {MAX_METRICS} allowed")
    out = {}
    for key, value in raw.items():
        if not isinstance(key, str) or not _METRIC_KEY.fullmatch(key):
            raise _refuse("R20", f"invalid metric name {str(key)[:80]!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _refuse("R20", f"metric {key!r} must be a number, got {type(value).__name__}")
        if not math.isfinite(value):
            raise _refuse("R20", f"metric {key!r} must be finite, got {value}")
        out[key] = float(value)
    return out


def _fields(obj: dict[str, Any]) -> ClientUpdate:
    """The fields in the table's order (docs/wire-format.md), so the first bad one is reported."""
    federation = _str(obj, "federation", "R16", _ID)
    device = _str(obj, "device", "R16", _ID)
    round_, base_version, samples = _int(obj, "round"), _int(obj, "base_version"), _int(obj, "samples")
    kind = _str(obj, "kind", "R18", choices=UPDATE_KINDS)
    spec_hash = _str(obj, "spec_hash", "R19", _HASH)
    codec = _str(obj, "codec", "R18", choices=codec_names())
    metrics = _metrics(obj.get("metrics", {}))
    payload = obj.get("payload")
    if not isinstance(payload, bytes):
        raise _refuse("R21", f"field 'payload' must be bin, got {type(payload).__name__}")
    control = obj.get("control", b"")
    if not isinstance(control, bytes) or ("control" in obj and not control):
        raise _refuse("R21", f"field 'control' (optional) must be a non-empty bin, got {type(control).__name__} "
                             f"of {len(control) if isinstance(control, bytes) else '-'} bytes")
    return ClientUpdate(federation=federation, device=device, round=round_, base_version=base_version,
                        samples=samples, kind=kind, spec_hash=spec_hash, codec=codec, payload=payload,
                        metrics=metrics, control=control)


def encode_update(update: ClientUpdate) -> bytes:
    """Serialise ``update`` as a msgpack map (docs/wire-format.md, "Client update envelope").

    Raises:
        WireError: a field is out of range (the same rules :func:`decode_update` enforces).
    """
    body = {"v": PROTOCOL_VERSION, "type": MESSAGE_TYPE, "federation": update.federation,
            "device": update.device, "round": update.round, "base_version": update.base_version,
            "samples": update.samples, "kind": update.kind, "spec_hash": update.spec_hash,
            "codec": update.codec, "metrics": dict(update.metrics), "payload": bytes(update.payload)}
    if update.control:
        body["control"] = bytes(update.control)
    _fields(body)
    return msgpack.packb(body, use_bin_type=True)


def max_update_bytes(spec: ParamSpec) -> int:
    """Largest envelope :func:`decode_update` accepts for ``spec`` by default (bytes)."""
    return max(max_payload_bytes(c, spec) for c in codec_names()) + MAX_ENVELOPE_OVERHEAD


def decode_update(data: bytes, spec: ParamSpec, *, max_bytes: int | None = None) -> ClientUpdate:
    """Parse and check a client update envelope against ``spec``.

    Args:
        data: the message.
        spec: the global model's ParamSpec.
        max_bytes: refuse larger messages (default :func:`max_update_bytes`; the smaller wins).

    Returns:
        The :class:`ClientUpdate`; its payload fits the codec's size bound for ``spec`` but is
        not decoded yet (use :func:`fedmq.codecs.decode_sparse`).

    Raises (the first rule broken, in the spec's order; the message ends with ``(rule Rn)``):
        WireError: oversized (R1), not the msgpack subset (R2-R13), unknown protocol version
            (R14), wrong type (R15) or field (R16-R21).
        SpecMismatchError: ``spec_hash`` differs from ``spec.hash`` (R22).
        CodecError: the payload's (or the control payload's, when present) size is impossible
            for the codec and ``spec`` (R23).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"update: expected bytes, got {type(data).__name__}")
    limit = max_update_bytes(spec) if max_bytes is None else min(max_bytes, max_update_bytes(spec))
    if len(data) > limit:
        raise _refuse("R1", f"{len(data)} bytes exceeds the {limit}-byte limit")
    obj = unpack_map(data, "update")
    version = obj.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise _refuse("R14", f"unsupported protocol version {version!r}, expected {PROTOCOL_VERSION}")
    if obj.get("type") != MESSAGE_TYPE:
        raise _refuse("R15", f"expected type {MESSAGE_TYPE!r}, got {str(obj.get('type'))[:80]!r}")
    update = _fields(obj)
    if update.spec_hash != spec.hash:
        raise SpecMismatchError(f"update from {update.device!r}: ParamSpec {update.spec_hash}, expected {spec.hash} "
                                f"(rule R22)")
    bound = max_payload_bytes(update.codec, spec)
    for what, payload in (("payload", update.payload), ("control", update.control)):
        if what == "control" and not payload:
            continue
        if len(payload) > bound or (update.codec == "none" and len(payload) != bound):
            raise CodecError(f"update from {update.device!r}: {update.codec} {what} of {len(payload)} bytes "
                             f"is impossible for this ParamSpec (bound {bound}) (rule R23)")
    return update
