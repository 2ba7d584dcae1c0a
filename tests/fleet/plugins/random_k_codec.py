"""A test-only codec with parameters of its own: seeded random-k. One module plus its registry line.

``test-random-k`` sends ``k = ceil(k_fraction * size)`` coordinates drawn uniformly at random
(no scaling: error feedback keeps what is not sent), as u32 ``k``, ``k`` u32 positions
(strictly increasing) and ``k`` float32 values, little-endian. ``seed_mode`` says where the
draw comes from: ``"content"`` (default) seeds it with the SHA-256 of the vector's bytes, so
the same vector gives the same payload anywhere (the coordinator's downlink too); ``"rng"``
uses the generator the caller passes (a device's per-round generator; fresh entropy without one).
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from fedmq.codecs import CodecParams, CodecSpec, SparseUpdate, check_vector, register_codec
from fedmq.errors import CodecError, NonFiniteError
from fedmq.model.params import ParamSpec

SEED_MODES = ("content", "rng")


@dataclass(frozen=True)
class RandomKParams(CodecParams):
    """``k_fraction``: share of coordinates sent, in (0, 1]; ``seed_mode``: one of SEED_MODES."""

    density_param: ClassVar[str | None] = "k_fraction"
    k_fraction: float = 0.05
    seed_mode: str = "content"

    def check(self) -> None:
        if not 0.0 < self.k_fraction <= 1.0:
            raise CodecError(f"test-random-k: k_fraction must be in (0, 1], got {self.k_fraction!r}")
        if self.seed_mode not in SEED_MODES:
            raise CodecError(f"test-random-k: seed_mode must be one of {SEED_MODES}, got {self.seed_mode[:80]!r}")


class RandomK:
    name = "test-random-k"
    Params = RandomKParams

    def encode(self, vector: np.ndarray, spec: ParamSpec, config: CodecSpec,
               rng: np.random.Generator | None = None) -> bytes:
        vec = check_vector(vector, spec)
        k = max(1, min(spec.size, math.ceil(config.params.k_fraction * spec.size)))
        if config.params.seed_mode == "content":
            rng = np.random.default_rng(int.from_bytes(hashlib.sha256(vec.tobytes()).digest()[:8], "little"))
        elif rng is None:
            rng = np.random.default_rng()
        idx = np.sort(rng.choice(spec.size, size=k, replace=False))
        return struct.pack("<I", k) + idx.astype("<u4").tobytes() + vec[idx].astype("<f4").tobytes()

    def decode_sparse(self, payload: bytes | memoryview, spec: ParamSpec) -> SparseUpdate:
        data = bytes(payload)
        if len(data) < 4:
            raise CodecError("test-random-k: payload shorter than its count")
        (k,) = struct.unpack_from("<I", data)
        if not 1 <= k <= spec.size or len(data) != 4 + 8 * k:
            raise CodecError(f"test-random-k: {k} values in {len(data)} bytes for {spec.size} coordinates")
        idx = np.frombuffer(data, dtype="<u4", count=k, offset=4).astype(np.int64)
        if np.any(np.diff(idx) <= 0) or idx[-1] >= spec.size:
            raise CodecError("test-random-k: positions must increase strictly within the vector")
        values = np.frombuffer(data, dtype="<f4", count=k, offset=4 + 4 * k).astype(np.float32)
        if not np.isfinite(values).all():
            raise NonFiniteError("test-random-k: NaN or Inf")
        return SparseUpdate(None, values, spec.size) if k == spec.size else SparseUpdate(idx, values, spec.size)

    def max_payload_bytes(self, spec: ParamSpec) -> int:
        return 4 + 8 * spec.size


register_codec(RandomK())
