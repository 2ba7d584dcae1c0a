"""Control messages of the fedmq protocol (everything but the client update and blobs).

Each message is one msgpack map with ``"v"`` (protocol version, int) and ``"type"`` (str).
Decoding is strict and follows the spec's numbered refusal rules: the size (R1), the
msgpack subset (R2-R13, :mod:`fedmq.wire.strict_msgpack`), the protocol version (R14) and type
(R15), then each field in the table's order: missing or of the wrong type (R24), out of
range (R25). Every refusal is a :class:`fedmq.errors.WireError` whose message ends with
the rule id, never anything else. Unknown extra keys are
ignored (forward compatibility within one protocol version). The client update envelope
lives in :mod:`fedmq.wire.envelope`; chunked blobs in :mod:`fedmq.transport`.
See docs/wire-format.md for the byte-level description.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import msgpack

from fedmq import PROTOCOL_VERSION
from fedmq.codecs import DEFAULT_CODEC, CodecSpec, all_param_names, get_codec
from fedmq.errors import CodecError, WireError
from fedmq.wire.strict_msgpack import unpack_map

#: Largest control message accepted, bytes. Control messages are small maps.
MAX_CONTROL_BYTES = 64 * 1024

UPDATE_KINDS = ("delta", "gradient")
#: Client algorithms of :attr:`TrainPlan.algorithm`.
ALGORITHMS = ("fedavg", "scaffold")


def unpack_control(data: bytes, expected_type: str) -> dict[str, Any]:
    """The map of a control message of type ``expected_type`` (the same reader for every control
    message, :mod:`fedmq.fl.chain` included). Raises WireError (rules R1, R2-R13, R14, R15)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"{expected_type}: expected bytes, got {type(data).__name__}")
    if len(data) > MAX_CONTROL_BYTES:
        raise WireError(f"{expected_type}: {len(data)} bytes exceeds the {MAX_CONTROL_BYTES}-byte limit (rule R1)")
    obj = unpack_map(data, expected_type)
    version = obj.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:  # True == 1 and 1.0 == 1 in Python
        raise WireError(f"{expected_type}: unsupported protocol version {version!r}, expected {PROTOCOL_VERSION} "
                        f"(rule R14)")
    if obj.get("type") != expected_type:
        raise WireError(f"expected a {expected_type!r} message, got type {str(obj.get('type'))[:80]!r} (rule R15)")
    return obj


def get_field(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, *, optional: bool = False,
              default: Any = None) -> Any:
    """``obj[key]`` of type ``kind`` (an int is taken for a float, a bool never for a number; floats
    finite), or ``default`` when ``optional`` and absent. Raises WireError (rule R24)."""
    if key not in obj or obj[key] is None:
        if optional:
            return default
        raise WireError(f"{where}: missing field {key!r} (rule R24)")
    value = obj[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) and bool not in kinds:
        raise WireError(f"{where}: field {key!r} must be {'/'.join(k.__name__ for k in kinds)}, got bool (rule R24)")
    if not isinstance(value, kinds):
        raise WireError(f"{where}: field {key!r} must be {'/'.join(k.__name__ for k in kinds)}, "
                        f"got {type(value).__name__} (rule R24)")
    if isinstance(value, float) and not math.isfinite(value):
        raise WireError(f"{where}: field {key!r} must be finite, got {value} (rule R24)")
    return value


def nonneg_field(value: int, key: str, where: str) -> int:
    """``value`` when >= 0. Raises WireError (rule R25) naming ``key`` and ``where``."""
    if value < 0:
        raise WireError(f"{where}: field {key!r} must be >= 0, got {value} (rule R25)")
    return value


class _Message:
    TYPE: ClassVar[str]

    def to_bytes(self) -> bytes:
        """Encode as a msgpack map with protocol version and type, then the fields in order."""
        body = {"v": PROTOCOL_VERSION, "type": self.TYPE}
        for name in _field_names(type(self)):
            value = getattr(self, name)
            if type(value) not in _SCALARS:
                # A nested field (a list, a map): asdict's deep copy, the fields in the same order.
                body.update(asdict(self))  # type: ignore[call-overload]
                break
            body[name] = value
        return msgpack.packb(body, use_bin_type=True)


#: Field types :meth:`_Message.to_bytes` packs as they are (a receipt's, a status's), without
#: ``dataclasses.asdict``'s recursive copy (a receipt: 5.3 us with it, 1.3 us without).
_SCALARS = frozenset((str, int, float, bool, bytes, type(None)))


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    """The dataclass fields of message class ``cls``, in declaration order."""
    return tuple(f.name for f in fields(cls))


@dataclass(frozen=True)
class Status(_Message):
    """Retained device presence on ``fedmq/F/status/D``; also the device's last will
    (``online=False``).

    Fields: device id; online flag; task name; ParamSpec hash (hex str); number of local
    training samples; software version; ``ts`` wall-clock seconds since the epoch;
    ``instance``: a random id of the agent's run (hex str, "" from older agents), so that
    two agents configured with one device id can be told apart.
    ``refusal``: why the device refuses to train (e.g. its task's ParamSpec differs from the
    federation's global model), ``""`` when it does not.
    """

    TYPE: ClassVar[str] = "status"
    device: str
    online: bool
    task: str = ""
    spec_hash: str = ""
    samples: int = 0
    software: str = ""
    ts: float = 0.0
    instance: str = ""
    refusal: str = ""

    @classmethod
    def from_bytes(cls, data: bytes) -> Status:
        """Raises: WireError on any malformed input."""
        o = unpack_control(data, cls.TYPE)
        w = cls.TYPE
        return cls(device=get_field(o, "device", str, w), online=get_field(o, "online", bool, w),
                   task=get_field(o, "task", str, w, optional=True, default=""),
                   spec_hash=get_field(o, "spec_hash", str, w, optional=True, default=""),
                   samples=nonneg_field(get_field(o, "samples", int, w, optional=True, default=0), "samples", w),
                   software=get_field(o, "software", str, w, optional=True, default=""),
                   ts=get_field(o, "ts", float, w, optional=True, default=0.0),
                   instance=get_field(o, "instance", str, w, optional=True, default=""),
                   refusal=get_field(o, "refusal", str, w, optional=True, default=""))


#: Blob formats a ``ModelPointer`` may name (docs/wire-format.md, rule R25).
MODEL_FORMATS = ("safetensors", "onnx")


@dataclass(frozen=True)
class ModelPointer(_Message):
    """Retained pointer on ``fedmq/F/model/latest`` (and ``onnx/latest``) to the newest
    global model version. ``round`` is the last completed round that produced it
    (0 for the initial model); ``size`` and ``sha256`` describe the blob (bytes, hex)."""

    TYPE: ClassVar[str] = "model_pointer"
    version: int
    spec_hash: str
    round: int
    size: int
    sha256: str
    format: str = "safetensors"

    @classmethod
    def from_bytes(cls, data: bytes) -> ModelPointer:
        o = unpack_control(data, cls.TYPE)
        w = cls.TYPE
        return cls(version=nonneg_field(get_field(o, "version", int, w), "version", w),
                   spec_hash=get_field(o, "spec_hash", str, w), round=nonneg_field(get_field(o, "round", int, w), "round", w),
                   size=nonneg_field(get_field(o, "size", int, w), "size", w), sha256=get_field(o, "sha256", str, w),
                   format=_format(get_field(o, "format", str, w, optional=True, default="safetensors"), w))


def _format(value: str, where: str) -> str:
    if value not in MODEL_FORMATS:
        raise WireError(f"{where}: format must be one of {MODEL_FORMATS}, got {value[:80]!r} (rule R25)")
    return value


@dataclass(frozen=True)
class RoundAnnouncement(_Message):
    """Retained on ``fedmq/F/round``: the round in progress, the model version it trains
    from, and its deadline (wall-clock seconds since the epoch)."""

    TYPE: ClassVar[str] = "round"
    round: int
    model_version: int
    deadline: float
    state: str = "open"  # open | closed | failed

    @classmethod
    def from_bytes(cls, data: bytes) -> RoundAnnouncement:
        o = unpack_control(data, cls.TYPE)
        w = cls.TYPE
        round_ = nonneg_field(get_field(o, "round", int, w), "round", w)
        model_version = nonneg_field(get_field(o, "model_version", int, w), "model_version", w)
        deadline = get_field(o, "deadline", float, w)
        state = get_field(o, "state", str, w, optional=True, default="open")
        if state not in ("open", "closed", "failed"):
            raise WireError(f"{w}: state must be open|closed|failed, got {state[:80]!r} (rule R25)")
        return cls(round=round_, model_version=model_version, deadline=deadline, state=state)


@dataclass(frozen=True)
class TrainPlan:
    """Client training settings sent with each task.

    Exactly one of ``local_steps`` / ``local_epochs`` is > 0. ``lr`` is the local SGD
    learning rate; ``prox_mu`` the FedProx coefficient (Li et al. 2020; 0 disables it);
    ``max_seconds`` caps local training time (seconds, 0 = no cap). ``codec`` is the codec of
    the client update with its own parameters (:class:`fedmq.codecs.CodecSpec`; default
    ``topk-int8`` at its defaults, :class:`fedmq.codecs.topk_int8.TopKParams`); on the wire and
    in ``[plan]`` its parameters are keys of the plan itself (:meth:`as_table`).
    ``error_feedback`` False disables the residual (for ablations only).
    ``clip_norm`` (L2 norm, 0 = no clipping) bounds what the device sends under differential
    privacy: the vector the coordinator decodes has norm <= ``clip_norm``
    (:mod:`fedmq.privacy.clipping`); ``noise_std`` (0 = none) is the standard deviation of the
    Gaussian noise share the device adds to every coordinate under distributed noise
    (docs/privacy.md).
    ``algorithm``: the client algorithm, ``fedavg`` (plain local SGD; FedProx with
    ``prox_mu`` > 0) or ``scaffold`` (Karimireddy et al. 2020, control variates;
    :mod:`fedmq.fl.scaffold`; needs update kind ``delta`` and ``prox_mu`` 0). A device that
    predates the field ignores it and trains FedAvg.
    """

    update_kind: str = "delta"
    local_steps: int = 0
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    prox_mu: float = 0.0
    max_seconds: float = 0.0
    codec: CodecSpec = field(default_factory=CodecSpec)
    error_feedback: bool = True
    seed: int = 0
    clip_norm: float = 0.0
    noise_std: float = 0.0
    algorithm: str = "fedavg"

    def validate(self, where: str = "train plan") -> TrainPlan:
        """Raises: WireError when a field is out of range."""
        if self.update_kind not in UPDATE_KINDS:
            raise WireError(f"{where}: update_kind must be one of {UPDATE_KINDS}, got {self.update_kind[:80]!r} "
                            f"(rule R25)")
        if self.local_steps < 0 or self.local_epochs < 0 or (self.local_steps > 0) == (self.local_epochs > 0):
            raise WireError(f"{where}: exactly one of local_steps / local_epochs must be > 0 "
                            f"(got {self.local_steps}, {self.local_epochs}) (rule R25)")
        if self.batch_size < 1 or self.lr <= 0 or self.prox_mu < 0 or self.max_seconds < 0:
            raise WireError(f"{where}: batch_size >= 1, lr > 0, prox_mu >= 0, max_seconds >= 0 expected (rule R25)")
        if not isinstance(self.codec, CodecSpec):
            raise WireError(f"{where}: codec must be a fedmq.codecs.CodecSpec, got {type(self.codec).__name__}")
        if not (0.0 <= self.clip_norm < math.inf and 0.0 <= self.noise_std < math.inf):
            raise WireError(f"{where}: clip_norm and noise_std must be finite and >= 0, got {self.clip_norm}, "
                            f"{self.noise_std} (rule R25)")
        if self.noise_std > 0 and (self.codec.name != "none" or self.clip_norm == 0):
            raise WireError(f"{where}: a noise share (noise_std > 0) needs codec none and a clip_norm (rule R25)")
        if self.algorithm not in ALGORITHMS:
            raise WireError(f"{where}: algorithm must be one of {ALGORITHMS}, got {self.algorithm[:80]!r} (rule R25)")
        if self.algorithm == "scaffold" and (self.update_kind != "delta" or self.prox_mu > 0):
            raise WireError(f"{where}: algorithm scaffold needs update_kind delta and prox_mu 0 (rule R25)")
        return self

    def as_table(self) -> dict[str, Any]:
        """The plan as the RoundTask carries it: one flat map, the codec's name under ``codec`` and
        each of its parameters under its own name right after it (docs/wire-format.md, "Task")."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "codec":
                out.update(self.codec.as_table())
            elif f.name != "algorithm" or self.algorithm != "fedavg":
                # FedAvg is what a map without ``algorithm`` means: a default task keeps the
                # map an older device reads, byte for byte.
                out[f.name] = getattr(self, f.name)
        return out

    @classmethod
    def from_wire(cls, raw: dict[str, Any], where: str) -> TrainPlan:
        """Read a plan map (strict types, rule R24; ranges, rule R25). Keys that are neither a
        plan field nor a parameter of the named codec are ignored (forward compatibility); a
        parameter the map leaves out takes the codec's default.

        Raises:
            WireError: a field of the wrong type or out of range, or an unknown codec.
        """
        kwargs = {key: get_field(raw, key, kind, where) for key, kind in _PLAN_TYPES.items() if key in raw}
        name = get_field(raw, "codec", str, where, optional=True, default=DEFAULT_CODEC)
        try:
            kinds = get_codec(name).Params.types()
            params = {key: get_field(raw, key, kind, where) for key, kind in kinds.items() if key in raw}
            kwargs["codec"] = CodecSpec(name, params)
        except CodecError as exc:
            raise WireError(f"{where}: {exc} (rule R25)") from None
        return cls(**kwargs).validate(where)

    @classmethod
    def from_table(cls, table: Mapping[str, Any], where: str = "plan") -> TrainPlan:
        """A plan from a flat table such as ``[plan]``: plan fields, ``codec`` (a name or a
        :class:`~fedmq.codecs.CodecSpec`) and codec parameters (the named codec's are taken; those
        of other registered codecs are ignored, so switching codec is one line). Values are
        taken as they are (a number for a float, no strings).

        Raises:
            WireError: a key that is no plan field and no codec's parameter, or a field out of
                range. CodecError: unknown codec or an invalid codec parameter.
        """
        plan_fields = {f.name for f in fields(cls)}
        codec = table.get("codec", DEFAULT_CODEC)
        rest = {k: v for k, v in table.items() if k not in plan_fields}
        kwargs = {k: v for k, v in table.items() if k in plan_fields and k != "codec"}
        if isinstance(codec, CodecSpec):
            if rest:
                raise WireError(f"{where}: codec parameters {sorted(rest)} next to a CodecSpec")
        else:
            unknown = sorted(set(rest) - set(all_param_names()))
            if unknown:
                raise WireError(f"{where}: unknown option(s) {unknown}; expected some of "
                                f"{sorted(plan_fields | set(all_param_names()))}")
            codec = CodecSpec.from_table(codec, rest)
        for key, kind in _PLAN_TYPES.items():
            value = kwargs.get(key)
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                kwargs[key] = float(value)
            elif key in kwargs and (not isinstance(value, kind) or isinstance(value, bool) is not (kind is bool)):
                raise WireError(f"{where}: {key} must be {kind.__name__}, got {value!r}")
        return cls(codec=codec, **kwargs).validate(where)

    @staticmethod
    def option_names() -> tuple[str, ...]:
        """The keys a ``[plan]`` table may hold: the plan's fields and every registered codec's
        parameters."""
        return tuple(f.name for f in fields(TrainPlan)) + all_param_names()


_PLAN_TYPES: dict[str, type] = {
    "update_kind": str, "local_steps": int, "local_epochs": int, "batch_size": int, "lr": float,
    "prox_mu": float, "max_seconds": float, "error_feedback": bool, "seed": int, "clip_norm": float,
    "noise_std": float, "algorithm": str,
}


@dataclass(frozen=True)
class RoundTask(_Message):
    """Per-device task on ``fedmq/F/task/D`` (retained, QoS 1): train from global model
    ``model_version`` for ``round`` and send a client update before ``deadline``
    (wall-clock seconds since the epoch). ``model_sha256`` (64 hex chars) is the SHA-256
    of that version's float32 parameter vector when the downlink is compressed (the device
    then catches up through the version chain, :mod:`fedmq.fl.chain`); "" otherwise.
    ``secure_aggregation``: the round is a secure round (:mod:`edge_client.secure`): the device
    sends a masked input on ``fedmq/F/secagg/D/input`` instead of a client update."""

    TYPE: ClassVar[str] = "task"
    federation: str
    device: str
    round: int
    model_version: int
    spec_hash: str
    deadline: float
    plan: TrainPlan = field(default_factory=TrainPlan)
    model_sha256: str = ""
    secure_aggregation: bool = False

    def to_bytes(self) -> bytes:
        """Encode as a msgpack map; the plan as :meth:`TrainPlan.as_table` writes it."""
        body: dict[str, Any] = {"v": PROTOCOL_VERSION, "type": self.TYPE}
        body.update({f.name: getattr(self, f.name) for f in fields(self)}, plan=self.plan.as_table())
        return msgpack.packb(body, use_bin_type=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> RoundTask:
        o = unpack_control(data, cls.TYPE)
        w = cls.TYPE
        federation, device = get_field(o, "federation", str, w), get_field(o, "device", str, w)
        round_ = nonneg_field(get_field(o, "round", int, w), "round", w)
        model_version = nonneg_field(get_field(o, "model_version", int, w), "model_version", w)
        spec_hash, deadline = get_field(o, "spec_hash", str, w), get_field(o, "deadline", float, w)
        plan = TrainPlan.from_wire(get_field(o, "plan", dict, w), f"{w}.plan")
        return cls(federation=federation, device=device, round=round_, model_version=model_version,
                   spec_hash=spec_hash, deadline=deadline, plan=plan,
                   model_sha256=get_field(o, "model_sha256", str, w, optional=True, default=""),
                   secure_aggregation=get_field(o, "secure_aggregation", bool, w, optional=True, default=False))


RECEIPT_STATUSES = ("accepted", "rejected")


@dataclass(frozen=True)
class Receipt(_Message):
    """Coordinator's answer to one client update on ``fedmq/F/receipt/D``.

    ``status`` is ``accepted`` (the update is in the aggregate of ``round``) or
    ``rejected`` with ``reason`` (one of the coordinator's rejection reasons, e.g.
    ``late``, ``duplicate``, ``malformed``). ``transfer_id`` names the update transfer and
    ``round`` the update's own round (its envelope's, or the one its manifest names when the
    refusal came before the envelope was read), never merely the round in progress: the
    device settles the update whose round and transfer these are.
    """

    TYPE: ClassVar[str] = "receipt"
    device: str
    round: int
    transfer_id: str
    status: str
    reason: str = ""

    @classmethod
    def from_bytes(cls, data: bytes) -> Receipt:
        o = unpack_control(data, cls.TYPE)
        w = cls.TYPE
        device = get_field(o, "device", str, w)
        round_ = nonneg_field(get_field(o, "round", int, w), "round", w)
        transfer_id = get_field(o, "transfer_id", str, w)
        status = get_field(o, "status", str, w)
        if status not in RECEIPT_STATUSES:
            raise WireError(f"{w}: status must be one of {RECEIPT_STATUSES}, got {status[:80]!r} (rule R25)")
        return cls(device=device, round=round_, transfer_id=transfer_id, status=status,
                   reason=get_field(o, "reason", str, w, optional=True, default=""))
