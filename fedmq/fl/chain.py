"""Wire formats of the compressed downlink: the delta blob and the retained version chain.

Byte layouts in docs/wire-format.md, "Downlink: delta blob" and "Downlink: version chain".
A **delta blob** (retained, chunked like every blob, at ``fedmq/F/model/delta/V``) carries
the codec payload that turns global model version ``V-1`` into ``V``
(:func:`fedmq.fl.downlink.apply_delta`) and the SHA-256 of both parameter vectors. The
**version chain** (one retained msgpack map on ``fedmq/F/model/chain``) names the latest
version, the retained snapshot, the deltas of the window and the hash of every version they
reach, plus the federation's seed and the hash of version 0 so that a device can build the
initial model itself. Decoding is strict and raises :class:`~fedmq.errors.WireError` only.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack
import numpy as np

from fedmq import PROTOCOL_VERSION
from fedmq.codecs import codec_names
from fedmq.errors import SpecMismatchError, WireError
from fedmq.fl.downlink import apply_delta, params_sha256
from fedmq.wire.messages import get_field, nonneg_field, unpack_control  # one strict reader for every control message
from fedmq.model.params import ParamSpec

DELTA_MAGIC = b"FMQD"
DELTA_LAYOUT = 1
#: magic, layout, codec name length; then the name; then _DELTA_TAIL.
_DELTA_HEAD = struct.Struct("<4sBB")
#: spec hash (8 raw bytes), base version, version, base params SHA-256, params SHA-256, payload bytes.
_DELTA_TAIL = struct.Struct("<8sQQ32s32sI")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX16 = re.compile(r"^[0-9a-f]{16}$")
_U63 = 2**63 - 1


@dataclass(frozen=True)
class DeltaBlob:
    """One version's model delta.

    Fields:
        codec: registered codec name of ``payload`` (``topk-int8``).
        spec_hash: ParamSpec hash, 16 hex chars.
        base_version: the version it applies to (``version - 1``).
        version: the version it produces.
        base_sha256, sha256: :func:`fedmq.fl.downlink.params_sha256` of both vectors (hex).
        payload: the codec payload.
    """

    codec: str
    spec_hash: str
    base_version: int
    version: int
    base_sha256: str
    sha256: str
    payload: bytes

    def to_bytes(self) -> bytes:
        """The blob's bytes. Raises WireError when a field is out of range."""
        self._check()
        name = self.codec.encode("ascii")
        return b"".join([_DELTA_HEAD.pack(DELTA_MAGIC, DELTA_LAYOUT, len(name)), name,
                         _DELTA_TAIL.pack(bytes.fromhex(self.spec_hash), self.base_version, self.version,
                                          bytes.fromhex(self.base_sha256), bytes.fromhex(self.sha256),
                                          len(self.payload)), bytes(self.payload)])

    def _check(self) -> None:
        if self.codec not in codec_names():
            raise WireError(f"delta blob: unknown codec {self.codec!r}, expected one of {codec_names()}")
        if not _HEX16.match(self.spec_hash):
            raise WireError(f"delta blob: spec hash must be 16 hex chars, got {self.spec_hash!r}")
        for what, h in (("base_sha256", self.base_sha256), ("sha256", self.sha256)):
            if not _HEX64.match(h):
                raise WireError(f"delta blob: {what} must be 64 lower-case hex chars, got {h[:80]!r}")
        if not (0 <= self.base_version < self.version <= _U63) or self.version != self.base_version + 1:
            raise WireError(f"delta blob: versions {self.base_version} -> {self.version}, expected V-1 -> V")

    def apply(self, published: np.ndarray, spec: ParamSpec) -> np.ndarray:
        """Version ``self.version``'s float32 ``(spec.size,)`` vector from version
        ``base_version``'s (:func:`fedmq.fl.downlink.apply_delta`), both hashes verified.

        Raises:
            SpecMismatchError: another ParamSpec. WireError: ``published`` is not the base
            version (SHA-256), or the result's SHA-256 differs. CodecError: bad payload.
        """
        if self.spec_hash != spec.hash:
            raise SpecMismatchError(f"delta {self.version}: ParamSpec {self.spec_hash}, the model has {spec.hash}")
        if params_sha256(published) != self.base_sha256:
            raise WireError(f"delta {self.version}: base SHA-256 does not match the model held (not version "
                            f"{self.base_version})")
        out = apply_delta(published, self.codec, self.payload, spec)
        got = params_sha256(out)
        if got != self.sha256:
            raise WireError(f"delta {self.version}: SHA-256 after applying is {got[:12]}, the blob says "
                            f"{self.sha256[:12]}")
        return out

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> DeltaBlob:
        """Parse and check a delta blob (the payload itself is checked by the codec when applied).

        Raises:
            WireError: bad magic or layout, truncated, trailing bytes, a field out of range.
        """
        view = memoryview(data).cast("B")
        if len(view) < _DELTA_HEAD.size:
            raise WireError(f"delta blob: {len(view)} bytes, shorter than its header")
        magic, layout, name_len = _DELTA_HEAD.unpack(view[:_DELTA_HEAD.size])
        if magic != DELTA_MAGIC:
            raise WireError(f"delta blob: magic {bytes(magic)!r}, expected {DELTA_MAGIC!r}")
        if layout != DELTA_LAYOUT:
            raise WireError(f"delta blob: layout {layout}, expected {DELTA_LAYOUT}")
        pos = _DELTA_HEAD.size
        if len(view) < pos + name_len + _DELTA_TAIL.size:
            raise WireError("delta blob: truncated header")
        try:
            codec = bytes(view[pos:pos + name_len]).decode("ascii")
        except UnicodeDecodeError:
            raise WireError("delta blob: codec name is not ASCII") from None
        pos += name_len
        spec, base, version, base_sha, sha, length = _DELTA_TAIL.unpack(view[pos:pos + _DELTA_TAIL.size])
        pos += _DELTA_TAIL.size
        if len(view) - pos != length:
            raise WireError(f"delta blob: payload of {len(view) - pos} bytes, header says {length}")
        blob = cls(codec, spec.hex(), base, version, base_sha.hex(), sha.hex(), bytes(view[pos:]))
        blob._check()
        return blob


@dataclass(frozen=True)
class ChainEntry:
    """One retained blob of the chain: ``version``, ``size`` and ``blob_sha256`` of its bytes,
    ``sha256`` of the parameter vector it yields."""

    version: int
    size: int
    blob_sha256: str
    sha256: str

    def to_obj(self) -> list[Any]:
        return [self.version, self.size, self.blob_sha256, self.sha256]

    @classmethod
    def from_obj(cls, obj: Any, where: str) -> ChainEntry:
        if not isinstance(obj, list) or len(obj) != 4:
            raise WireError(f"{where}: expected [version, size, blob_sha256, sha256]")
        version, size, blob_sha, sha = obj
        for key, value in (("version", version), ("size", size)):
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _U63:
                raise WireError(f"{where}: {key} must be an int in 0..2**63-1, got {value!r}")
        for key, value in (("blob_sha256", blob_sha), ("sha256", sha)):
            if not isinstance(value, str) or not _HEX64.match(value):
                raise WireError(f"{where}: {key} must be 64 lower-case hex chars")
        return cls(version, size, blob_sha, sha)


@dataclass(frozen=True)
class ModelChain:
    """Retained on ``fedmq/F/model/chain``: the version chain of a compressed downlink.

    Fields:
        spec_hash: ParamSpec hash (16 hex).
        codec: downlink codec of the deltas.
        seed: the federation's seed; version 0 is ``task.build_model(seed)``.
        origin_sha256: params SHA-256 of version 0.
        latest: newest version; latest_sha256: its params SHA-256.
        snapshot: the newest retained safetensors snapshot (at ``fedmq/F/model/V``).
        deltas: retained deltas, ascending versions (the window).
    """

    TYPE: ClassVar[str] = "model_chain"
    spec_hash: str
    codec: str
    seed: int
    origin_sha256: str
    latest: int
    latest_sha256: str
    snapshot: ChainEntry
    deltas: tuple[ChainEntry, ...] = field(default_factory=tuple)

    def delta_sizes(self) -> dict[int, int]:
        """Version -> delta blob bytes."""
        return {e.version: e.size for e in self.deltas}

    def entry(self, version: int) -> ChainEntry | None:
        """The delta entry producing ``version`` (None when not retained)."""
        for e in self.deltas:
            if e.version == version:
                return e
        return None

    def sha256_of(self, version: int) -> str | None:
        """Params SHA-256 of ``version`` when the chain names it."""
        if version == self.latest:
            return self.latest_sha256
        if version == self.snapshot.version:
            return self.snapshot.sha256
        if version == 0:
            return self.origin_sha256
        e = self.entry(version)
        return None if e is None else e.sha256

    def to_bytes(self) -> bytes:
        return msgpack.packb({"v": PROTOCOL_VERSION, "type": self.TYPE, "spec_hash": self.spec_hash,
                              "codec": self.codec, "seed": self.seed, "origin_sha256": self.origin_sha256,
                              "latest": self.latest, "latest_sha256": self.latest_sha256,
                              "snapshot": self.snapshot.to_obj(), "deltas": [e.to_obj() for e in self.deltas]},
                             use_bin_type=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> ModelChain:
        """Raises: WireError on any malformed input (deltas must ascend, none after ``latest``)."""
        o = unpack_control(data, cls.TYPE)
        w = cls.TYPE
        spec_hash = get_field(o, "spec_hash", str, w)
        codec = get_field(o, "codec", str, w)
        if codec not in codec_names():
            raise WireError(f"{w}: unknown codec {codec!r}")
        seed = get_field(o, "seed", int, w)
        origin, latest_sha = get_field(o, "origin_sha256", str, w), get_field(o, "latest_sha256", str, w)
        if not _HEX64.match(origin) or not _HEX64.match(latest_sha) or not _HEX16.match(spec_hash):
            raise WireError(f"{w}: hashes must be lower-case hex (16 for spec_hash, 64 for SHA-256)")
        latest = nonneg_field(get_field(o, "latest", int, w), "latest", w)
        snapshot = ChainEntry.from_obj(get_field(o, "snapshot", list, w), f"{w}.snapshot")
        raw = get_field(o, "deltas", list, w)
        deltas = tuple(ChainEntry.from_obj(e, f"{w}.deltas[{i}]") for i, e in enumerate(raw))
        versions = [e.version for e in deltas]
        if versions != sorted(set(versions)) or (versions and (versions[0] < 1 or versions[-1] > latest)):
            raise WireError(f"{w}: delta versions must ascend within 1..latest, got {versions[:8]}")
        if snapshot.version > latest:
            raise WireError(f"{w}: snapshot version {snapshot.version} after latest {latest}")
        return cls(spec_hash, codec, seed, origin, latest, latest_sha, snapshot, deltas)
