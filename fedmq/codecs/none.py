"""Codec ``none``: dense little-endian float32, for comparison runs (docs/wire-format.md, "Codec none")."""

from __future__ import annotations

import numpy as np

from fedmq.codecs.base import CodecSpec, NoParams, SparseUpdate, as_view, check_vector
from fedmq.errors import CodecError, NonFiniteError
from fedmq.model.params import ParamSpec


class DenseFloat32:
    """Dense float32: payload is ``4 * spec.size`` bytes, ``<f4`` in ParamSpec order."""

    name = "none"
    Params = NoParams

    def encode(self, vector: np.ndarray, spec: ParamSpec, config: CodecSpec,
               rng: np.random.Generator | None = None) -> bytes:
        """The vector's bytes. Raises SpecMismatchError (shape), NonFiniteError (NaN/Inf)."""
        return check_vector(vector, spec).astype("<f4", copy=False).tobytes()

    def decode_sparse(self, payload: bytes | memoryview, spec: ParamSpec) -> SparseUpdate:
        """A dense :class:`SparseUpdate`. Raises CodecError (length), NonFiniteError."""
        view = as_view(payload)
        if len(view) != 4 * spec.size:
            raise CodecError(f"codec none: payload of {len(view)} bytes, expected {4 * spec.size} (rule R43)")
        vec = np.frombuffer(view, dtype="<f4").astype(np.float32)
        if not np.isfinite(vec).all():
            raise NonFiniteError("codec none: NaN or Inf value (rule R44)")
        return SparseUpdate(None, vec, spec.size)

    def max_payload_bytes(self, spec: ParamSpec) -> int:
        """Exactly ``4 * spec.size`` bytes."""
        return 4 * spec.size
