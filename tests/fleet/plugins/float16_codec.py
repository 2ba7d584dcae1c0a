"""A test-only codec: dense IEEE half precision. One module plus its registry line."""

from __future__ import annotations

import numpy as np

from fedmq.codecs import CodecSpec, NoParams, SparseUpdate, check_vector, register_codec
from fedmq.errors import CodecError, NonFiniteError
from fedmq.model.params import ParamSpec


class Float16:
    name = "test-float16"
    Params = NoParams

    def encode(self, vector: np.ndarray, spec: ParamSpec, config: CodecSpec,
               rng: np.random.Generator | None = None) -> bytes:
        return check_vector(vector, spec).astype("<f2").tobytes()

    def decode_sparse(self, payload: bytes | memoryview, spec: ParamSpec) -> SparseUpdate:
        if len(payload) != 2 * spec.size:
            raise CodecError(f"test-float16: {len(payload)} bytes, expected {2 * spec.size}")
        values = np.frombuffer(payload, dtype="<f2").astype(np.float32)
        if not np.isfinite(values).all():
            raise NonFiniteError("test-float16: NaN or Inf")
        return SparseUpdate(None, values, spec.size)

    def max_payload_bytes(self, spec: ParamSpec) -> int:
        return 2 * spec.size


register_codec(Float16())
