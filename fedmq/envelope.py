"""The client update envelope: one msgpack map around a codec payload.

Byte layout in docs/wire-format.md, "Client update envelope". Decoding is strict: the size
of the message is bounded by the ParamSpec before msgpack sees it, every field's type and
range is checked, the spec hash must match and the payload must fit the codec's bound.
Everything malformed raises :class:`~fedmq.errors.WireError` (or a subclass), nothing else.
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
from fedmq.params import ParamSpec

MESSAGE_TYPE = "update"
UPDATE_KINDS = ("delta", "gradient")
#: Bytes allowed for everything in the envelope but the payload.
MAX_ENVELOPE_OVERHEAD = 16 * 1024
MAX_METRICS = 64
_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_METRIC_KEY = re.compile(r"^[A-Za-z0-9_./-]{1,64}$")
_HASH = re.compile(r"^[0-9a-f]{16}$")
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
        spec_hash: :attr:`fedmq.params.ParamSpec.hash` of the model.
        codec: ``"topk-int8"`` or ``"none"``.
        payload: the codec payload (bytes).
        metrics: name -> finite float (e.g. ``train_loss``), at most 64 entries.
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


def _int(obj: dict[str, Any], key: str) -> int:
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise WireError(f"update: field {key!r} must be an int, got {type(value).__name__}")
    if not 0 <= value <= _INT_MAX:
        raise WireError(f"update: field {key!r} must be in 0..2**63-1, got {value}")
    return value


def _str(obj: dict[str, Any], key: str, pattern: re.Pattern[str] | None = None,
         choices: tuple[str, ...] | None = None) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise WireError(f"update: field {key!r} must be a str, got {type(value).__name__}")
    if pattern is not None and not pattern.match(value):
        raise WireError(f"update: field {key!r} has an invalid value {value[:80]!r}")
    if choices is not None and value not in choices:
        raise WireError(f"update: field {key!r} must be one of {choices}, got {value[:80]!r}")
    return value


def _metrics(raw: Any) -> dict[str, float]:
    if not isinstance(raw, dict):
        raise WireError(f"update: field 'metrics' must be a map, got {type(raw).__name__}")
    if len(raw) > MAX_METRICS:
        raise WireError(f"update: {len(raw)} metrics, at most {MAX_METRICS} allowed")
    out = {}
    for key, value in raw.items():
        if not isinstance(key, str) or not _METRIC_KEY.match(key):
            raise WireError(f"update: invalid metric name {str(key)[:80]!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise WireError(f"update: metric {key!r} must be a number, got {type(value).__name__}")
        if not math.isfinite(value):
            raise WireError(f"update: metric {key!r} must be finite, got {value}")
        out[key] = float(value)
    return out


def _fields(obj: dict[str, Any]) -> ClientUpdate:
    payload = obj.get("payload")
    if not isinstance(payload, bytes):
        raise WireError(f"update: field 'payload' must be bin, got {type(payload).__name__}")
    return ClientUpdate(
        federation=_str(obj, "federation", _ID), device=_str(obj, "device", _ID), round=_int(obj, "round"),
        base_version=_int(obj, "base_version"), samples=_int(obj, "samples"),
        kind=_str(obj, "kind", choices=UPDATE_KINDS), spec_hash=_str(obj, "spec_hash", _HASH),
        codec=_str(obj, "codec", choices=codec_names()), payload=payload, metrics=_metrics(obj.get("metrics", {})))


def encode_update(update: ClientUpdate) -> bytes:
    """Serialise ``update`` as a msgpack map (docs/wire-format.md, "Client update envelope").

    Raises:
        WireError: a field is out of range (the same rules :func:`decode_update` enforces).
    """
    body = {"v": PROTOCOL_VERSION, "type": MESSAGE_TYPE, "federation": update.federation,
            "device": update.device, "round": update.round, "base_version": update.base_version,
            "samples": update.samples, "kind": update.kind, "spec_hash": update.spec_hash,
            "codec": update.codec, "metrics": dict(update.metrics), "payload": bytes(update.payload)}
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

    Raises:
        WireError: oversized, not msgpack, unknown protocol version, wrong type or field.
        SpecMismatchError: ``spec_hash`` differs from ``spec.hash``.
        CodecError: the payload's size is impossible for the codec and ``spec``.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"update: expected bytes, got {type(data).__name__}")
    limit = max_update_bytes(spec) if max_bytes is None else min(max_bytes, max_update_bytes(spec))
    if len(data) > limit:
        raise WireError(f"update: {len(data)} bytes exceeds the {limit}-byte limit")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True,
                              max_bin_len=limit, max_str_len=MAX_ENVELOPE_OVERHEAD, max_array_len=256,
                              max_map_len=256, max_ext_len=0)
    except Exception as exc:  # msgpack raises several unrelated types (ValueError, ExtraData, ...)
        raise WireError(f"update: not a valid msgpack document ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise WireError(f"update: expected a msgpack map, got {type(obj).__name__}")
    version = obj.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise WireError(f"update: unsupported protocol version {version!r}, expected {PROTOCOL_VERSION}")
    if obj.get("type") != MESSAGE_TYPE:
        raise WireError(f"update: expected type {MESSAGE_TYPE!r}, got {str(obj.get('type'))[:80]!r}")
    update = _fields(obj)
    if update.spec_hash != spec.hash:
        raise SpecMismatchError(f"update from {update.device!r}: ParamSpec {update.spec_hash}, expected {spec.hash}")
    bound = max_payload_bytes(update.codec, spec)
    if len(update.payload) > bound or (update.codec == "none" and len(update.payload) != bound):
        raise CodecError(f"update from {update.device!r}: {update.codec} payload of {len(update.payload)} bytes "
                         f"is impossible for this ParamSpec (bound {bound})")
    return update
