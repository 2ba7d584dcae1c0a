"""Byte formats of chunked blobs: the manifest, the chunk header and the TransferRequest.

A blob at base topic ``B`` travels as a manifest on ``B/m`` and, unless it is inline,
chunks on ``B/c/0`` .. ``B/c/{count-1}``. Decoding is strict: anything malformed raises
:class:`fedmq.errors.WireError`. See docs/wire-format.md, section "Chunked blobs".
"""

from __future__ import annotations

import hashlib
import math
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import msgpack

from fedmq import PROTOCOL_VERSION
from fedmq.errors import WireError

#: Chunk header: magic ``FQC1``, 16-byte transfer id, uint32 big-endian chunk index.
CHUNK_HEADER = struct.Struct(">4s16sI")
CHUNK_MAGIC = b"FQC1"
#: Most chunks one blob may have (the manifest carries 4 bytes of CRC-32 per chunk).
MAX_CHUNKS = 1 << 20
#: Largest blob accepted by default (bytes).
MAX_BLOB_BYTES = 2 << 30
#: Most chunk indices one TransferRequest may list.
MAX_REQUEST_CHUNKS = 65536


def chunk_crcs(data: bytes | memoryview, chunk_size: int) -> bytes:
    """CRC-32 of each ``chunk_size`` slice of ``data``, packed big-endian (4 bytes each)."""
    view = memoryview(data)
    count = math.ceil(len(view) / chunk_size)
    return struct.pack(f">{count}I", *(zlib.crc32(view[i * chunk_size:(i + 1) * chunk_size]) for i in range(count)))


@dataclass(frozen=True)
class Manifest:
    """Description of one blob transfer.

    Attributes:
        transfer_id: 16 random bytes naming this transfer (a retry of the same data gets a new one).
        size: blob size, bytes.
        chunk_size: bytes per chunk (the last one may be shorter); 0 when inline.
        count: number of chunk messages; 0 when the data is inline.
        sha256: SHA-256 of the whole blob (32 bytes).
        crcs: CRC-32 of each chunk, 4 bytes each, big-endian (locates a corrupted chunk so
            only that one is fetched again; the SHA-256 is what is trusted).
        inline: the whole blob when it fits in the manifest, else None.
        round: client updates only: the round the update answers (the envelope's
            ``round``), so that a transfer refused before it is assembled gets a receipt
            naming its own round; None when the sender did not say (other blobs).
    """

    transfer_id: bytes
    size: int
    chunk_size: int
    count: int
    sha256: bytes
    crcs: bytes = b""
    inline: bytes | None = None
    round: int | None = None

    TYPE = "blob_manifest"

    @property
    def id_hex(self) -> str:
        return self.transfer_id.hex()

    def crc(self, index: int) -> int:
        return struct.unpack_from(">I", self.crcs, 4 * index)[0]

    def chunk_len(self, index: int) -> int:
        """Bytes of chunk ``index``."""
        return min(self.chunk_size, self.size - index * self.chunk_size)

    @classmethod
    def build(cls, transfer_id: bytes, data: bytes | memoryview, chunk_size: int, *, inline: bool,
              round_: int | None = None) -> Manifest:
        """Manifest for ``data`` cut in ``chunk_size`` chunks, or inline; ``round_`` as :attr:`round`."""
        digest = hashlib.sha256(data).digest()
        if inline:
            return cls(transfer_id, len(data), 0, 0, digest, b"", bytes(data), round_)
        return cls(transfer_id, len(data), chunk_size, math.ceil(len(data) / chunk_size), digest,
                   chunk_crcs(data, chunk_size), None, round_)

    def to_bytes(self) -> bytes:
        body: dict[str, Any] = {"v": PROTOCOL_VERSION, "type": self.TYPE, "id": self.transfer_id, "size": self.size,
                                "chunk": self.chunk_size, "count": self.count, "sha256": self.sha256,
                                "crc": self.crcs}
        if self.inline is not None:
            body["d"] = self.inline
        if self.round is not None:
            body["round"] = self.round
        return msgpack.packb(body, use_bin_type=True)

    @classmethod
    def from_bytes(cls, data: bytes, *, max_size: int = MAX_BLOB_BYTES) -> Manifest:
        """Decode and check consistency (count matches size and chunk size, CRC table
        length, inline data length).

        Raises:
            WireError: malformed, inconsistent, or announcing more than ``max_size`` bytes.
        """
        w = cls.TYPE
        try:
            o = msgpack.unpackb(data, raw=False, strict_map_key=True, max_array_len=16, max_map_len=32)
        except Exception as exc:  # msgpack raises several unrelated types
            raise WireError(f"{w}: not a valid msgpack document ({exc})") from None
        if not isinstance(o, dict):
            raise WireError(f"{w}: expected a msgpack map")
        if o.get("v") != PROTOCOL_VERSION or o.get("type") != w:
            raise WireError(f"{w}: expected v={PROTOCOL_VERSION} type={w!r}, got v={o.get('v')!r} "
                            f"type={o.get('type')!r}")
        tid, size, chunk, count, digest = (o.get(k) for k in ("id", "size", "chunk", "count", "sha256"))
        crcs, inline, round_ = o.get("crc", b""), o.get("d"), o.get("round")
        if not (isinstance(tid, bytes) and len(tid) == 16):
            raise WireError(f"{w}: 'id' must be 16 bytes")
        if not (isinstance(digest, bytes) and len(digest) == 32):
            raise WireError(f"{w}: 'sha256' must be 32 bytes")
        for key, value in (("size", size), ("chunk", chunk), ("count", count)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise WireError(f"{w}: {key!r} must be an integer >= 0, got {value!r}")
        if round_ is not None and (not isinstance(round_, int) or isinstance(round_, bool)
                                   or not 0 <= round_ < 2**63):
            raise WireError(f"{w}: 'round' must be an integer in 0..2^63-1, got {round_!r}")
        if size > max_size:
            raise WireError(f"{w}: blob of {size} bytes exceeds the {max_size}-byte limit")
        if not isinstance(crcs, bytes) or (inline is not None and not isinstance(inline, bytes)):
            raise WireError(f"{w}: 'crc' and 'd' must be bytes")
        if inline is not None:
            if count != 0 or len(inline) != size:
                raise WireError(f"{w}: inline blob must have count 0 and {size} bytes of data, "
                                f"got count {count} and {len(inline)} bytes")
        else:
            if chunk < 1 or count > MAX_CHUNKS or count != math.ceil(size / chunk):
                raise WireError(f"{w}: count {count} does not match size {size} / chunk {chunk}")
            if len(crcs) != 4 * count:
                raise WireError(f"{w}: 'crc' must hold 4 bytes per chunk ({4 * count}), got {len(crcs)}")
        return cls(tid, size, chunk, count, digest, crcs, inline, round_)


def pack_chunk(transfer_id: bytes, index: int, data: bytes | memoryview) -> bytes:
    """Chunk message payload: header then the chunk's bytes."""
    return CHUNK_HEADER.pack(CHUNK_MAGIC, transfer_id, index) + data


def unpack_chunk_header(payload: bytes) -> tuple[bytes, int]:
    """``(transfer_id, index)`` of a chunk message. Raises: WireError."""
    if len(payload) < CHUNK_HEADER.size:
        raise WireError(f"blob chunk: {len(payload)} bytes is shorter than its {CHUNK_HEADER.size}-byte header")
    magic, tid, index = CHUNK_HEADER.unpack_from(payload)
    if magic != CHUNK_MAGIC:
        raise WireError(f"blob chunk: bad magic {magic!r}, expected {CHUNK_MAGIC!r}")
    return tid, index


@dataclass(frozen=True)
class TransferRequest:
    """Receiver -> sender: send chunks of a non-retained transfer again.

    Published on ``topics.transfer_requests(F, D)`` to device D. ``chunks`` lists the
    indices missing or corrupt at the receiver; empty means the whole transfer (manifest
    and every chunk).
    """

    base: str
    transfer_id: bytes
    chunks: tuple[int, ...] = ()

    TYPE = "transfer_request"

    def to_bytes(self) -> bytes:
        return msgpack.packb({"v": PROTOCOL_VERSION, "type": self.TYPE, "base": self.base,
                              "id": self.transfer_id, "chunks": list(self.chunks)}, use_bin_type=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> TransferRequest:
        """Raises: WireError on anything malformed."""
        w = cls.TYPE
        try:
            o = msgpack.unpackb(data, raw=False, strict_map_key=True, max_array_len=MAX_REQUEST_CHUNKS,
                                max_map_len=16, max_str_len=4096, max_bin_len=64)
        except Exception as exc:  # msgpack raises several unrelated types
            raise WireError(f"{w}: not a valid msgpack document ({exc})") from None
        if not isinstance(o, dict) or o.get("v") != PROTOCOL_VERSION or o.get("type") != w:
            raise WireError(f"{w}: expected a map with v={PROTOCOL_VERSION} type={w!r}")
        base, tid, chunks = o.get("base"), o.get("id"), o.get("chunks", [])
        if not isinstance(base, str) or not base:
            raise WireError(f"{w}: 'base' must be a non-empty string")
        if not (isinstance(tid, bytes) and len(tid) == 16):
            raise WireError(f"{w}: 'id' must be 16 bytes")
        if not isinstance(chunks, list) or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < MAX_CHUNKS
                                                   for i in chunks):
            raise WireError(f"{w}: 'chunks' must be a list of chunk indices")
        return cls(base, tid, tuple(chunks))
