"""Wire messages of a secure round (docs/wire-format.md, "Secure-aggregation messages").

Every message is one msgpack map with ``"v"`` (protocol version), ``"type"``, ``"round"``
(int >= 0) and ``"attempt"`` (the coordinator's id of this run of the round, 16 lowercase hex
characters: a coordinator that restarts reruns the round under a new attempt, and devices
make fresh keys for it). Decoding is as strict as :mod:`fedmq.wire.messages` (rules R1-R25, the
message ends with the rule id) with larger bounds: a masked input holds ``8 * k`` bytes and a
request names up to :data:`MAX_DEVICES` devices.

Direction and topic (:mod:`fedmq.wire.topics`): device -> coordinator on
``fedmq/F/secagg/D/{kind}`` (a device's own topics: the ACL's ``pattern write
fedmq/+/secagg/%u/#``), coordinator -> device on ``fedmq/F/secagg-to/D``.

=================  =====================  =========================================
type               direction              content
=================  =====================  =========================================
sa_setup           coordinator -> D       the round's parameters (phase 0)
sa_setup_dp        coordinator -> D       the same, with differential privacy (phase 0)
sa_keys            D -> coordinator       two X25519 public keys (phase 1)
sa_neighbours      coordinator -> D       the neighbours' keys in U1 (end of phase 1)
sa_shares          D -> coordinator       HPKE ciphertexts by recipient (phase 2)
sa_relay           coordinator -> D       ciphertexts for D by sender in U2 (end of phase 2)
sa_input           D -> coordinator       the masked input, uint64 LE (phase 3)
sa_unmask          coordinator -> D       survivors U3 and dropped U2 \\ U3 (phase 4)
sa_reveal          D -> coordinator       shares of b (survivors) and s (dropped) (phase 4)
sa_result          coordinator -> D       closed or failed, survivors (retained)
=================  =====================  =========================================
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Self

import msgpack
import numpy as np

from fedmq import PROTOCOL_VERSION
from fedmq.errors import ConfigError, WireError
from fedmq.wire.messages import get_field, nonneg_field
from fedmq.secagg.ring import MAX_BITS
from fedmq.secagg.shamir import SHARE_BYTES
from fedmq.wire.strict_msgpack import Limits, unpack_map
from fedmq.wire.topics import check_id

#: Largest flat model a setup may describe (a 32 MiB support bitmap at most, inflated).
MAX_MODEL_SIZE = 2**28
#: Most devices a secure round holds (bounds every map and list of these messages).
MAX_DEVICES = 1024
#: Largest secure-aggregation message, bytes: a masked input of up to 131,072 values.
MAX_SECAGG_BYTES = 8 * 131_072 + 1024
#: Largest per-device noise standard deviation a setup may name, integers (the ring, at most
#: 63 bits, must still hold the noisy sum).
MAX_NOISE_STD = 2.0 ** 40
_LIMITS = Limits(max_str=16384, max_entries=MAX_DEVICES, max_depth=4, max_items=8 * MAX_DEVICES + 64)
_ATTEMPT = re.compile(r"^[0-9a-f]{16}$")
#: Bytes of one HPKE ciphertext of two shares (fedmq.secagg.protocol: 2 * 66 + 32 + 16).
SEALED_SHARES_BYTES = 2 * SHARE_BYTES + 48
KEY_BYTES = 32
RESULT_STATES = ("closed", "failed")


def _unpack(data: bytes, expected_type: str) -> dict[str, Any]:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"{expected_type}: expected bytes, got {type(data).__name__}")
    if len(data) > MAX_SECAGG_BYTES:
        raise WireError(f"{expected_type}: {len(data)} bytes exceeds the {MAX_SECAGG_BYTES}-byte limit (rule R1)")
    obj = unpack_map(data, expected_type, _LIMITS)
    version = obj.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise WireError(f"{expected_type}: unsupported protocol version {version!r}, expected {PROTOCOL_VERSION} "
                        f"(rule R14)")
    if obj.get("type") != expected_type:
        raise WireError(f"expected a {expected_type!r} message, got type {str(obj.get('type'))[:80]!r} (rule R15)")
    return obj


def _inflate(data: bytes, size: int) -> bytes:
    """A zlib stream inflated to at most ceil(size / 8) + 1 bytes (b"" when it is not a
    complete zlib stream): a larger one is refused, never allocated."""
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, -(-size // 8) + 1)
    except zlib.error:
        return b""
    return out if d.eof and not d.unconsumed_tail and not d.unused_data else b""


def _head(o: dict[str, Any], w: str) -> tuple[int, str]:
    round_ = nonneg_field(get_field(o, "round", int, w), "round", w)
    attempt = get_field(o, "attempt", str, w)
    if not _ATTEMPT.match(attempt):
        raise WireError(f"{w}: attempt must be 16 lowercase hex characters (rule R25)")
    return round_, attempt


def _device(value: Any, w: str, what: str = "device") -> str:
    if not isinstance(value, str):
        raise WireError(f"{w}: {what} must be str (rule R24)")
    try:
        return check_id(value, what)
    except ConfigError:
        raise WireError(f"{w}: {what} {value[:80]!r} is not a valid device id (rule R25)") from None


def _devices(o: dict[str, Any], key: str, w: str) -> tuple[str, ...]:
    items = get_field(o, key, list, w)
    out = tuple(_device(d, w, key) for d in items)
    if len(set(out)) != len(out):
        raise WireError(f"{w}: {key} repeats a device (rule R25)")
    return out


def _bin_map(o: dict[str, Any], key: str, w: str, size: int) -> dict[str, bytes]:
    raw = get_field(o, key, dict, w)
    out = {}
    for dev, value in raw.items():
        if not isinstance(value, bytes) or len(value) != size:
            raise WireError(f"{w}: {key}[{str(dev)[:64]!r}] must be {size} bytes (rule R25)")
        out[_device(dev, w, key)] = value
    return out


def _key(o: dict[str, Any], key: str, w: str) -> bytes:
    value = get_field(o, key, bytes, w)
    if len(value) != KEY_BYTES:
        raise WireError(f"{w}: {key} must be {KEY_BYTES} bytes, got {len(value)} (rule R25)")
    return value


class _SecAggMessage:
    TYPE: ClassVar[str]

    def _body(self) -> dict[str, Any]:
        raise NotImplementedError

    def to_bytes(self) -> bytes:
        """Encode as a msgpack map with protocol version and type."""
        body = {"v": PROTOCOL_VERSION, "type": self.TYPE}
        body.update(self._body())
        return msgpack.packb(body, use_bin_type=True)


@dataclass(frozen=True)
class Setup(_SecAggMessage):
    """Phase 0: what every device of the round must know (:class:`fedmq.secagg.RoundParams`).

    ``devices`` sorted and distinct; ``support`` the common support as a zlib-compressed
    (RFC 1950) bitmap of the flat model's ``size`` coordinates (``ceil(size / 8)`` bytes once
    inflated, bit i of byte i // 8 from the least significant: coordinate i is on it; at least
    one set; 1.5 KB for the digits MLP's 85,002 coordinates; the coordinator derives it,
    :func:`coordinator.secure.plan_support`, and sends it so that a device that missed a model
    version cannot put its values on other coordinates); ``clip`` (update units) and ``scale``
    (integers per unit) of the ring; ``seed`` of the graph; ``degree`` and ``threshold`` of
    SecAgg+; ``deadline`` of the masked inputs (wall-clock seconds since the epoch).
    """

    TYPE: ClassVar[str] = "sa_setup"
    round: int
    attempt: str
    devices: tuple[str, ...]
    size: int
    support: bytes
    clip: float
    scale: float
    seed: int
    degree: int
    threshold: int
    deadline: float

    @classmethod
    def bitmap(cls, support: np.ndarray, size: int) -> bytes:
        """The ``support`` field for sorted int64 indices into ``(size,)``."""
        bits = np.zeros(size, dtype=np.uint8)
        bits[support] = 1
        return zlib.compress(np.packbits(bits, bitorder="little").tobytes(), 9)

    @property
    def k(self) -> int:
        return int(self.indices().size)

    def indices(self) -> np.ndarray:
        """The common support, sorted int64 ``(k,)``."""
        bits = np.unpackbits(np.frombuffer(_inflate(self.support, self.size), dtype=np.uint8), count=self.size,
                             bitorder="little")
        return np.flatnonzero(bits).astype(np.int64)

    def _body(self) -> dict[str, Any]:
        return {"round": self.round, "attempt": self.attempt, "devices": list(self.devices), "size": self.size,
                "support": self.support,
                "clip": self.clip, "scale": self.scale, "seed": self.seed, "degree": self.degree,
                "threshold": self.threshold, "deadline": self.deadline}

    @classmethod
    def from_bytes(cls, data: bytes) -> Setup:
        """Raises: WireError on any malformed input."""
        return cls._decode(data, cls.TYPE)

    @classmethod
    def _decode(cls, data: bytes, w: str) -> Setup:
        o = _unpack(data, w)
        round_, attempt = _head(o, w)
        devices = _devices(o, "devices", w)
        if devices != tuple(sorted(devices)) or len(devices) < 2:
            raise WireError(f"{w}: devices must be at least 2, sorted (rule R25)")
        size = get_field(o, "size", int, w)
        support = get_field(o, "support", bytes, w)
        bitmap = _inflate(support, size) if 1 <= size <= MAX_MODEL_SIZE else b""
        if len(bitmap) != -(-size // 8) or not any(bitmap) or (size % 8 and bitmap[-1] >> (size % 8)):
            raise WireError(f"{w}: support must be a bitmap of ceil(size / 8) bytes, at least one bit set, none "
                            f"past size (rule R25)")
        degree, threshold = (nonneg_field(get_field(o, key, int, w), key, w) for key in ("degree", "threshold"))
        clip, scale = (get_field(o, key, float, w) for key in ("clip", "scale"))
        if clip <= 0 or scale <= 0 or not 1 <= threshold <= degree:
            raise WireError(f"{w}: clip > 0, scale > 0, 1 <= threshold <= degree expected (rule R25)")
        return Setup(round_, attempt, devices, size, support, clip, scale, get_field(o, "seed", int, w), degree,
                     threshold, get_field(o, "deadline", float, w))


@dataclass(frozen=True)
class NoisySetup(Setup):
    """Phase 0 of a round under differential privacy (:mod:`fedmq.privacy.discrete`): a
    :class:`Setup` whose ``clip`` is the clip norm C, the L2 norm the device clips its values
    on the support to, and ``noise_std`` the standard deviation (integers, >= 1) of the
    discrete Gaussian noise the device adds to each integer of its input. A type of its own,
    so that a device that does not know it refuses the round instead of sending its input
    without noise."""

    TYPE: ClassVar[str] = "sa_setup_dp"
    noise_std: float = 1.0

    @classmethod
    def of(cls, setup: Setup, noise_std: float) -> NoisySetup:
        """``setup``'s round under differential privacy, each device adding noise of ``noise_std``."""
        return cls(**{f.name: getattr(setup, f.name) for f in fields(Setup)}, noise_std=noise_std)

    def _body(self) -> dict[str, Any]:
        return dict(super()._body(), noise_std=self.noise_std)

    @classmethod
    def from_bytes(cls, data: bytes) -> NoisySetup:
        """Raises: WireError on any malformed input."""
        base = Setup._decode(data, cls.TYPE)
        o = _unpack(data, cls.TYPE)
        std = get_field(o, "noise_std", float, cls.TYPE)
        if not 1.0 <= std <= MAX_NOISE_STD:
            raise WireError(f"{cls.TYPE}: noise_std must lie in [1, {MAX_NOISE_STD:g}] (rule R25)")
        return cls.of(base, std)


@dataclass(frozen=True)
class Keys(_SecAggMessage):
    """Phase 1, device -> coordinator: raw X25519 public keys c (shares) and s (masks), 32 bytes each."""

    TYPE: ClassVar[str] = "sa_keys"
    round: int
    attempt: str
    c_public: bytes
    s_public: bytes

    def _body(self) -> dict[str, Any]:
        return {"round": self.round, "attempt": self.attempt, "c_public": self.c_public, "s_public": self.s_public}

    @classmethod
    def from_bytes(cls, data: bytes) -> Keys:
        o = _unpack(data, cls.TYPE)
        w = cls.TYPE
        return cls(*_head(o, w), _key(o, "c_public", w), _key(o, "s_public", w))


@dataclass(frozen=True)
class Neighbours(_SecAggMessage):
    """End of phase 1, coordinator -> D: its neighbours in U1, device -> c_public + s_public (64 bytes)."""

    TYPE: ClassVar[str] = "sa_neighbours"
    round: int
    attempt: str
    keys: dict[str, bytes]

    def _body(self) -> dict[str, Any]:
        return {"round": self.round, "attempt": self.attempt, "keys": dict(self.keys)}

    @classmethod
    def from_bytes(cls, data: bytes) -> Neighbours:
        o = _unpack(data, cls.TYPE)
        w = cls.TYPE
        return cls(*_head(o, w), _bin_map(o, "keys", w, 2 * KEY_BYTES))


@dataclass(frozen=True)
class _SealedShares(_SecAggMessage):
    """Device -> sealed shares (HPKE ciphertexts of SEALED_SHARES_BYTES each): the body of
    :class:`Shares` and :class:`Relay`, which differ only in their direction and type."""

    round: int
    attempt: str
    sealed: dict[str, bytes]

    def _body(self) -> dict[str, Any]:
        return {"round": self.round, "attempt": self.attempt, "sealed": dict(self.sealed)}

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        o = _unpack(data, cls.TYPE)
        w = cls.TYPE
        return cls(*_head(o, w), _bin_map(o, "sealed", w, SEALED_SHARES_BYTES))


@dataclass(frozen=True)
class Shares(_SealedShares):
    """Phase 2, D -> coordinator: recipient -> HPKE ciphertext of its b and s shares (180 bytes)."""

    TYPE: ClassVar[str] = "sa_shares"


@dataclass(frozen=True)
class Relay(_SealedShares):
    """End of phase 2, coordinator -> D: sender in U2 -> the ciphertext it sealed to D."""

    TYPE: ClassVar[str] = "sa_relay"


@dataclass(frozen=True)
class MaskedInput(_SecAggMessage):
    """Phase 3, D -> coordinator: the masked input y, ``values`` as ``width``-byte little-endian
    unsigned integers (``width`` = ceil(ring bits / 8), 1..8), ``width * k`` bytes, each below
    2^63 (the ring's width is at most 63 bits; the receiver checks its own ring)."""

    TYPE: ClassVar[str] = "sa_input"
    round: int
    attempt: str
    width: int
    values: bytes

    @classmethod
    def pack(cls, round_: int, attempt: str, y: np.ndarray, bits: int) -> MaskedInput:
        """From ring elements ``y`` (uint64 ``(k,)``, below 2^bits)."""
        width = max(1, -(-bits // 8))
        raw = y.astype("<u8").view(np.uint8).reshape(-1, 8)[:, :width]
        return cls(round_, attempt, width, raw.tobytes())

    def _body(self) -> dict[str, Any]:
        return {"round": self.round, "attempt": self.attempt, "width": self.width, "values": self.values}

    def array(self) -> np.ndarray:
        """The masked input, uint64 ``(len(values) // width,)``."""
        raw = np.zeros((len(self.values) // self.width, 8), dtype=np.uint8)
        raw[:, :self.width] = np.frombuffer(self.values, dtype=np.uint8).reshape(-1, self.width)
        return raw.view("<u8").reshape(-1).astype(np.uint64)

    @classmethod
    def from_bytes(cls, data: bytes) -> MaskedInput:
        o = _unpack(data, cls.TYPE)
        w = cls.TYPE
        width, values = get_field(o, "width", int, w), get_field(o, "values", bytes, w)
        if not 1 <= width <= 8 or not values or len(values) % width:
            raise WireError(f"{w}: width in 1..8 and values a non-empty multiple of width bytes expected (rule R25)")
        msg = cls(*_head(o, w), width, values)
        if int(msg.array().max()) >> MAX_BITS:
            raise WireError(f"{w}: values must be below 2^{MAX_BITS} (rule R25)")
        return msg


@dataclass(frozen=True)
class Unmask(_SecAggMessage):
    """Phase 4, coordinator -> D: survivors U3 (reveal their b shares) and dropped U2 \\ U3 (reveal
    their s shares); disjoint, or the device refuses."""

    TYPE: ClassVar[str] = "sa_unmask"
    round: int
    attempt: str
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]

    def _body(self) -> dict[str, Any]:
        return {"round": self.round, "attempt": self.attempt, "survivors": list(self.survivors),
                "dropped": list(self.dropped)}

    @classmethod
    def from_bytes(cls, data: bytes) -> Unmask:
        o = _unpack(data, cls.TYPE)
        w = cls.TYPE
        return cls(*_head(o, w), _devices(o, "survivors", w), _devices(o, "dropped", w))


@dataclass(frozen=True)
class Reveal(_SecAggMessage):
    """Phase 4, D -> coordinator: owner -> share (66 bytes big-endian) of b (survivors) and s (dropped)."""

    TYPE: ClassVar[str] = "sa_reveal"
    round: int
    attempt: str
    b_shares: dict[str, bytes]
    s_shares: dict[str, bytes]

    def _body(self) -> dict[str, Any]:
        return {"round": self.round, "attempt": self.attempt, "b_shares": dict(self.b_shares),
                "s_shares": dict(self.s_shares)}

    @classmethod
    def from_bytes(cls, data: bytes) -> Reveal:
        o = _unpack(data, cls.TYPE)
        w = cls.TYPE
        return cls(*_head(o, w), _bin_map(o, "b_shares", w, SHARE_BYTES), _bin_map(o, "s_shares", w, SHARE_BYTES))


@dataclass(frozen=True)
class Result(_SecAggMessage):
    """Coordinator -> D, retained, sent after the round's checkpoint: ``closed`` (the survivors'
    inputs are in the global model: they keep their residual) or ``failed`` (nothing was
    aggregated: every device puts its input back into its residual)."""

    TYPE: ClassVar[str] = "sa_result"
    round: int
    attempt: str
    state: str
    survivors: tuple[str, ...]

    def _body(self) -> dict[str, Any]:
        return {"round": self.round, "attempt": self.attempt, "state": self.state,
                "survivors": list(self.survivors)}

    @classmethod
    def from_bytes(cls, data: bytes) -> Result:
        o = _unpack(data, cls.TYPE)
        w = cls.TYPE
        round_, attempt = _head(o, w)
        state = get_field(o, "state", str, w)
        if state not in RESULT_STATES:
            raise WireError(f"{w}: state must be one of {RESULT_STATES}, got {state[:80]!r} (rule R25)")
        return cls(round_, attempt, state, _devices(o, "survivors", w))


#: Device -> coordinator message kinds (the last topic level) and their types.
UPLINK = {"keys": Keys, "shares": Shares, "input": MaskedInput, "reveal": Reveal}
#: Coordinator -> device types by wire type.
DOWNLINK = {m.TYPE: m for m in (Setup, NoisySetup, Neighbours, Relay, Unmask, Result)}


def decode_downlink(data: bytes) -> Setup | Neighbours | Relay | Unmask | Result:
    """A coordinator -> device message, decoded by its ``type``.

    Raises:
        WireError: malformed, or not one of :data:`DOWNLINK`'s types (rule R15).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) > MAX_SECAGG_BYTES:
        raise WireError("secagg: expected bytes within the size limit (rule R1)")
    kind = unpack_map(data, "secagg", _LIMITS).get("type")
    cls = DOWNLINK.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise WireError(f"secagg: unknown message type {str(kind)[:80]!r} (rule R15)")
    return cls.from_bytes(bytes(data))
