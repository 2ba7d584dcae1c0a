"""The codec seam: what every client-update codec implements, and the registry that picks one.

A codec is a pure object with no memory of the past (error feedback lives in
:mod:`fedmq.feedback`): ``encode`` maps a float32 vector to bytes, ``decode`` /
``decode_sparse`` map bytes back, and ``max_payload_bytes`` bounds any valid payload from
the :class:`~fedmq.params.ParamSpec` alone, so a receiver can refuse an oversized transfer
before allocating anything for it. The design follows GRACE's ``Compressor`` (Xu et al.
2021, "GRACE: A Compressed Communication Framework for Distributed Machine Learning").

Adding a codec is one module with a class implementing :class:`Codec` plus one
:func:`register_codec` call (``fedmq/codecs/__init__.py`` registers the built-in ones);
its name then works everywhere a codec is named: the train plan (``plan.codec``), the
client-update envelope and the coordinator's validation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from fedmq.errors import CodecError, NonFiniteError, SpecMismatchError
from fedmq.messages import DENSE_BELOW, TOPK_MODES
from fedmq.params import ParamSpec

if TYPE_CHECKING:
    from fedmq.messages import TrainPlan

_U32_MAX = 2**32 - 1


@runtime_checkable
class Codec(Protocol):
    """A client-update codec (byte layouts of the built-in ones in docs/wire-format.md).

    Attributes:
        name: the wire name, 1-64 chars of ``[A-Za-z0-9_.-]`` (carried in every envelope).
    """

    name: str

    def encode(self, vector: np.ndarray, spec: ParamSpec, config: CodecConfig,
               rng: np.random.Generator | None = None) -> bytes:
        """Compress float32 ``(spec.size,)`` (finite) into a payload.

        Raises: SpecMismatchError (shape), NonFiniteError (NaN or Inf)."""
        ...

    def decode_sparse(self, payload: bytes | memoryview, spec: ParamSpec) -> SparseUpdate:
        """Decode and validate a payload completely before returning.

        Raises: CodecError (malformed), NonFiniteError (NaN or Inf)."""
        ...

    def max_payload_bytes(self, spec: ParamSpec) -> int:
        """Upper bound (bytes) on any valid payload for ``spec``."""
        ...


_REGISTRY: dict[str, Codec] = {}


def register_codec(codec: Codec) -> Codec:
    """Make ``codec`` available under ``codec.name`` (returns it, so it can decorate an instance).

    Raises:
        CodecError: the object is not a :class:`Codec`, or another codec has that name.
    """
    if not isinstance(codec, Codec):
        raise CodecError(f"{codec!r} does not implement fedmq.codecs.Codec (name, encode, decode_sparse, "
                         f"max_payload_bytes)")
    other = _REGISTRY.get(codec.name)
    if other is not None and other is not codec:
        raise CodecError(f"a codec named {codec.name!r} is already registered ({other!r})")
    _REGISTRY[codec.name] = codec
    return codec


def get_codec(name: str) -> Codec:
    """The registered codec called ``name``. Raises CodecError naming the known ones."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise CodecError(f"unknown codec {name!r}, expected one of {codec_names()}") from None


def codec_names() -> tuple[str, ...]:
    """Names of the registered codecs, in registration order."""
    return tuple(_REGISTRY)


@dataclass(frozen=True)
class CodecConfig:
    """Codec settings (the device side; decoding needs none of them).

    Fields:
        name: a registered codec (``"topk-int8"``, ``"none"``, ...).
        density: fraction of entries kept per tensor, in (0, 1]; a tensor of n elements keeps
            ``k = clamp(floor(density * n + 0.5), 1, n)`` entries. Default 1%.
        block_size: kept values per float32 scale, 1..2**32-1. Default 512 (about 0.06 bits
            per kept value of overhead, relative L2 error of the int8 step near 1.5e-2).
        dense_below: tensors with fewer elements go dense (still int8). Default
            :data:`fedmq.messages.DENSE_BELOW` (4096 elements), so that biases and small output
            layers are sent whole.
        stochastic: stochastic instead of round-to-nearest rounding (unbiased, noisier).
        topk: how the kept entries are shared among the tensors that go sparse.
            ``"global"`` (default): the same budget, ``sum(k)`` of the per-tensor rule, is
            spent on the entries of largest magnitude across all those tensors (each still
            keeps at least one), so a small layer whose update is large (an output layer) is
            not held to 1% of its entries. ``"per-tensor"``: every tensor keeps its own ``k``.
            Global selection is Top-K over the whole flattened update, as in Stich et al.
            2018 ("Sparsified SGD with Memory", arXiv 1809.07599) and Sattler et al. 2019
            (STC); per-tensor is DGC's layer-wise selection (Lin et al. 2018). On the digits
            demo global selection cut the median round to 95% from 17.5 to 12.5 at the same
            bytes (BENCHMARKS.md).

    Raises:
        CodecError: a field is out of range or the codec is unknown.
    """

    name: str = "topk-int8"
    density: float = 0.01
    block_size: int = 512
    dense_below: int = DENSE_BELOW
    stochastic: bool = False
    topk: str = "global"

    def __post_init__(self) -> None:
        get_codec(self.name)
        if not (isinstance(self.density, (int, float)) and 0.0 < self.density <= 1.0):
            raise CodecError(f"codec density must be in (0, 1], got {self.density!r}")
        if not (isinstance(self.block_size, int) and 1 <= self.block_size <= _U32_MAX):
            raise CodecError(f"codec block_size must be in 1..{_U32_MAX}, got {self.block_size!r}")
        if not (isinstance(self.dense_below, int) and self.dense_below >= 0):
            raise CodecError(f"codec dense_below must be >= 0, got {self.dense_below!r}")
        if self.topk not in TOPK_MODES:
            raise CodecError(f"codec topk must be one of {TOPK_MODES}, got {self.topk!r}")

    @classmethod
    def from_plan(cls, plan: TrainPlan) -> CodecConfig:
        """Codec settings of a task's :class:`~fedmq.messages.TrainPlan`. Raises CodecError."""
        return cls(name=plan.codec, density=plan.density, block_size=plan.block_size,
                   dense_below=plan.dense_below, stochastic=plan.stochastic, topk=plan.topk)

    def kept(self, n: int) -> int:
        """Number of entries Top-K keeps of a tensor of ``n`` elements."""
        return min(n, max(1, math.floor(self.density * n + 0.5)))


class SparseUpdate:
    """A decoded, fully validated client update, kept sparse for accumulation.

    Attributes:
        indices: int64 ``(nnz,)`` strictly increasing positions in the flat vector, or None
            when the update is dense (``values`` then has shape ``(size,)``).
        values: float32 ``(nnz,)``, all finite.
        size: length of the flat vector (``ParamSpec.size``).
    """

    __slots__ = ("indices", "values", "size")

    def __init__(self, indices: np.ndarray | None, values: np.ndarray, size: int) -> None:
        self.indices = indices
        self.values = values
        self.size = size

    @property
    def nnz(self) -> int:
        """Number of stored values."""
        return int(self.values.shape[0])

    def add_into(self, out: np.ndarray, weight: float) -> None:
        """``out[indices] += weight * values`` in place (the product in ``out``'s dtype).

        Args:
            out: float32 or float64 ``(size,)`` accumulator.
            weight: multiplier (e.g. the client's share of samples).

        Raises:
            SpecMismatchError: ``out`` has another shape.
        """
        if out.shape != (self.size,):
            raise SpecMismatchError(f"accumulator shape {out.shape} does not match update size ({self.size},)")
        if self.indices is None:
            out += weight * self.values
        else:
            # np.add.at reads, adds and writes each entry in one pass, about 1.5x faster than
            # fancy-index += (a gather, then a scatter) on a model-sized accumulator; but only
            # on its fast path, which needs the values in out's dtype: float32 values into a
            # float64 accumulator take a per-element loop some 20x slower.
            np.add.at(out, self.indices, np.multiply(self.values, weight, dtype=out.dtype))

    def l2_norm(self) -> float:
        """Euclidean norm of the update (float64 sum of squares)."""
        v = self.values.astype(np.float64)
        return float(math.sqrt(float(np.dot(v, v))))

    def to_dense(self, size: int | None = None) -> np.ndarray:
        """The update as float32 ``(size,)``. Raises SpecMismatchError if ``size`` differs."""
        if size is not None and size != self.size:
            raise SpecMismatchError(f"requested size {size}, update has size {self.size}")
        if self.indices is None:
            return self.values.copy()
        out = np.zeros(self.size, dtype=np.float32)
        out[self.indices] = self.values
        return out


def check_vector(vector: np.ndarray, spec: ParamSpec) -> np.ndarray:
    """``vector`` as contiguous float32 ``(spec.size,)``.

    Raises: SpecMismatchError (shape), NonFiniteError (NaN or Inf)."""
    vec = np.asarray(vector)
    if vec.shape != (spec.size,):
        raise SpecMismatchError(f"vector shape {vec.shape} does not match ParamSpec size ({spec.size},)")
    vec = np.ascontiguousarray(vec, dtype=np.float32)
    if not np.isfinite(vec).all():
        raise NonFiniteError("update vector contains NaN or Inf; refusing to encode it")
    return vec


def as_view(payload: object) -> memoryview:
    """``payload`` (bytes, bytearray or memoryview) as a flat byte view. Raises CodecError otherwise."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise CodecError(f"payload must be bytes, got {type(payload).__name__}")
    view = memoryview(payload)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    return view
