"""Client-update codecs behind one interface (:class:`Codec`), picked by name from a registry.

Built in: ``topk-int8`` (:mod:`fedmq.codecs.topk_int8`) and ``none``
(:mod:`fedmq.codecs.none`). A new codec is one module plus one :func:`register_codec`
line here (or in the user's own package, before the codec is used); it brings its own
parameters (its ``Params``), which the uplink plan and ``[downlink]`` carry in a
:class:`CodecSpec`. Schedules of a parameter over rounds (density warm-up) are in
:mod:`fedmq.codecs.schedule`.

The functions below dispatch on the codec's name; they are the only place that does.
"""

from __future__ import annotations

import numpy as np

from fedmq.codecs.base import (DEFAULT_CODEC, Codec, CodecParams, CodecSpec, NoParams, SparseUpdate,
                               all_param_names, check_vector, codec_names, get_codec, register_codec)
from fedmq.codecs.none import DenseFloat32
from fedmq.codecs.topk_int8 import TopKInt8
from fedmq.model.params import ParamSpec

register_codec(TopKInt8())
register_codec(DenseFloat32())

__all__ = ["DEFAULT_CODEC", "Codec", "CodecParams", "CodecSpec", "NoParams", "SparseUpdate", "all_param_names",
           "check_vector", "codec_names", "decode", "decode_sparse", "encode", "get_codec", "max_payload_bytes",
           "register_codec"]


def encode(vector: np.ndarray, spec: ParamSpec, config: CodecSpec,
           rng: np.random.Generator | None = None) -> bytes:
    """Compress a client update with ``config.name``'s codec.

    Args:
        vector: float32 ``(spec.size,)`` (other float dtypes are cast), all finite.
        spec: the model's ParamSpec.
        config: the codec and its parameters.
        rng: source of stochastic-rounding noise, if the codec uses any.

    Returns:
        The codec payload (layouts in docs/wire-format.md).

    Raises:
        SpecMismatchError: wrong vector shape. NonFiniteError: NaN or Inf in the vector.
        CodecError: unknown codec.
    """
    return get_codec(config.name).encode(vector, spec, config, rng)


def decode_sparse(codec: str, payload: bytes | memoryview, spec: ParamSpec) -> SparseUpdate:
    """Decompress a payload into a :class:`SparseUpdate`, validated completely before returning.

    Raises:
        CodecError: unknown codec or malformed payload; NonFiniteError for NaN/Inf scales or values.
    """
    return get_codec(codec).decode_sparse(payload, spec)


def decode(codec: str, payload: bytes | memoryview, spec: ParamSpec) -> np.ndarray:
    """Decompress a payload into a dense float32 ``(spec.size,)`` vector, zeros where nothing was sent.

    Raises:
        CodecError: unknown codec or malformed payload; NonFiniteError for NaN/Inf scales or values.
    """
    return get_codec(codec).decode_sparse(payload, spec).to_dense()


def max_payload_bytes(codec: str, spec: ParamSpec) -> int:
    """Upper bound (bytes) on any valid payload of ``codec`` for ``spec``. Raises CodecError (unknown)."""
    return get_codec(codec).max_payload_bytes(spec)
