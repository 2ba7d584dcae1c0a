"""The codec seam: what every client-update codec implements, and the registry that picks one.

A codec is a pure object with no memory of the past (error feedback lives in
:mod:`fedmq.fl.feedback`): ``encode`` maps a float32 vector to bytes, ``decode`` /
``decode_sparse`` map bytes back, and ``max_payload_bytes`` bounds any valid payload from
the :class:`~fedmq.model.params.ParamSpec` alone, so a receiver can refuse an oversized transfer
before allocating anything for it. The design follows GRACE's ``Compressor`` (Xu et al.
2021, "GRACE: A Compressed Communication Framework for Distributed Machine Learning").

Adding a codec is one module with a class implementing :class:`Codec` plus one
:func:`register_codec` call (``fedmq/codecs/__init__.py`` registers the built-in ones);
its name then works everywhere a codec is named: the train plan (``plan.codec``), the
client-update envelope and the coordinator's validation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Protocol, get_type_hints, runtime_checkable

import numpy as np

import fedmq.codecs.kernels as kernels
from fedmq.errors import CodecError, NonFiniteError, SpecMismatchError
from fedmq.model.params import ParamSpec


@runtime_checkable
class Codec(Protocol):
    """A client-update codec (byte layouts of the built-in ones in docs/wire-format.md).

    Attributes:
        name: the wire name, 1-64 chars of ``[A-Za-z0-9_.-]`` (carried in every envelope).
        Params: the codec's parameters, a :class:`CodecParams` subclass (:class:`NoParams` for
            none): their names, types, defaults and ranges, written once, in the codec's module.
            ``encode`` receives them validated, as ``config.params``.
    """

    name: str
    Params: type[CodecParams]

    def encode(self, vector: np.ndarray, spec: ParamSpec, config: CodecSpec,
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
        raise CodecError(f"{codec!r} does not implement fedmq.codecs.Codec (name, Params, encode, decode_sparse, "
                         f"max_payload_bytes)")
    if not (isinstance(codec.Params, type) and issubclass(codec.Params, CodecParams)):
        raise CodecError(f"codec {codec.name!r}: Params must be a fedmq.codecs.CodecParams subclass")
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


#: The codec of the uplink plan and of ``[downlink]`` when none is named.
DEFAULT_CODEC = "topk-int8"


@dataclass(frozen=True)
class CodecParams:
    """Base of a codec's own parameters: a frozen dataclass whose fields (with their defaults,
    written once, in the codec's module) are the codec's settings.

    Field types are ``float``, ``int``, ``bool`` or ``str``; construction checks every value's
    type (an int is taken for a float, a bool never for a number) and then the subclass's
    :meth:`check` (ranges). ``density_param`` names the field that is the fraction of entries
    the codec sends, the one a density schedule moves (:mod:`fedmq.codecs.schedule`); None
    when the codec has none.

    Raises:
        CodecError: a value of the wrong type or out of range (the message names the codec's
            parameter and what was expected).
    """

    density_param: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        hints = get_type_hints(type(self))
        for f in fields(self):
            value, kind = getattr(self, f.name), hints[f.name]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
                object.__setattr__(self, f.name, value)
            if isinstance(value, bool) is not (kind is bool) or not isinstance(value, kind):
                raise CodecError(f"codec parameter {f.name!r} must be {kind.__name__}, got {value!r}")
            if isinstance(value, float) and not math.isfinite(value):
                raise CodecError(f"codec parameter {f.name!r} must be finite, got {value!r}")
        self.check()

    def check(self) -> None:
        """Raise CodecError when a value is out of range (each codec says its own ranges)."""

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The parameters' names, in declaration order."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def types(cls) -> dict[str, type]:
        """Parameter name -> its type (``float``, ``int``, ``bool`` or ``str``)."""
        hints = get_type_hints(cls)
        return {name: hints[name] for name in cls.names()}

    def as_dict(self) -> dict[str, Any]:
        """Parameter name -> value, in declaration order (what the plan carries on the wire)."""
        return {name: getattr(self, name) for name in self.names()}

    @property
    def density(self) -> float:
        """The fraction of entries sent: the value of :attr:`density_param`, 1.0 without one."""
        return 1.0 if self.density_param is None else float(getattr(self, self.density_param))


@dataclass(frozen=True)
class NoParams(CodecParams):
    """The parameters of a codec that takes none (``none``)."""


@dataclass(frozen=True)
class CodecSpec:
    """A codec and its own parameters: what the uplink plan (``TrainPlan.codec``) and the
    downlink (``[downlink]``) carry, validated by the codec.

    Args:
        name: a registered codec (``"topk-int8"``, ``"none"``, ...).
        params: the codec's parameters: a mapping of some of them (the others take the codec's
            defaults), an instance of the codec's :attr:`Codec.Params`, or None (all defaults).
            Stored as that codec's ``Params`` instance.

    Raises:
        CodecError: unknown codec, a parameter the codec does not have, or a value of the
            wrong type or out of range.
    """

    name: str = DEFAULT_CODEC
    params: Any = None

    def __post_init__(self) -> None:
        kind = get_codec(self.name).Params
        raw = self.params
        if isinstance(raw, kind):
            return
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise CodecError(f"codec {self.name!r}: parameters must be a mapping, got {type(raw).__name__}")
        unknown = sorted(set(raw) - set(kind.names()))
        if unknown:
            raise CodecError(f"codec {self.name!r} has no parameter(s) {unknown}; its parameters: "
                             f"{list(kind.names())}")
        object.__setattr__(self, "params", kind(**raw))

    @classmethod
    def of(cls, name: str = DEFAULT_CODEC, **params: Any) -> CodecSpec:
        """``CodecSpec(name, params)``: e.g. ``CodecSpec.of(density=0.05)``. Raises CodecError."""
        return cls(name, params)

    @classmethod
    def from_table(cls, name: str, table: Mapping[str, Any]) -> CodecSpec:
        """The spec of codec ``name`` from a flat table that may also hold parameters of other
        registered codecs (``[plan]``, ``[downlink]``, the wire plan): ``name``'s own are taken,
        the others are left (a table that switches codec keeps working).

        Raises:
            CodecError: a key is a parameter of no registered codec, or a value is invalid.
        """
        kind = get_codec(name).Params
        stray = sorted(set(table) - set(all_param_names()))
        if stray:
            raise CodecError(f"{stray} are parameters of no codec; the codecs' parameters: {list(all_param_names())}")
        return cls(name, {k: v for k, v in table.items() if k in kind.names()})

    def with_params(self, **changes: Any) -> CodecSpec:
        """The same codec with some parameters changed. Raises CodecError."""
        return CodecSpec(self.name, {**self.params.as_dict(), **changes})

    def as_table(self) -> dict[str, Any]:
        """``{"codec": name, <param>: value, ...}``: the flat form of the plan and ``[downlink]``."""
        return {"codec": self.name, **self.params.as_dict()}

    @property
    def density(self) -> float:
        """Fraction of entries the codec sends (1.0 for a codec without a density parameter)."""
        return self.params.density


def all_param_names() -> tuple[str, ...]:
    """Every parameter name of every registered codec (each once, in registration order)."""
    return tuple(dict.fromkeys(n for codec in _REGISTRY.values() for n in codec.Params.names()))


class SparseUpdate:
    """A decoded, fully validated client update, kept sparse for accumulation.

    Attributes:
        indices: int64 ``(nnz,)`` strictly increasing positions in the flat vector, or None
            when the update is dense (``values`` then has shape ``(size,)``).
        values: float32 ``(nnz,)``, all finite.
        size: length of the flat vector (``ParamSpec.size``).
        sum_squares: float64 ``sum(values ** 2)`` when the decoder computed it (the compiled
            decode does, :mod:`fedmq.codecs.kernels`), else None (:meth:`l2_norm` sums them).
    """

    __slots__ = ("indices", "values", "size", "sum_squares")

    def __init__(self, indices: np.ndarray | None, values: np.ndarray, size: int,
                 sum_squares: float | None = None) -> None:
        self.indices = indices
        self.values = values
        self.size = size
        self.sum_squares = sum_squares

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
            return
        kern = kernels.get()
        if kern is not None and kern["scatter_add"](out, self.indices, self.values, out.dtype.type(weight)):
            return  # the compiled loop: same sums, one pass, about 4x faster (fedmq.codecs.kernels)
        # Without numba (or with an index out of range, which np.add.at raises as IndexError):
        # np.add.at reads, adds and writes each entry in one pass, about 1.5x faster than
        # fancy-index += (a gather, then a scatter) on a model-sized accumulator; but only
        # on its fast path, which needs the values in out's dtype: float32 values into a
        # float64 accumulator take a per-element loop some 20x slower.
        np.add.at(out, self.indices, np.multiply(self.values, weight, dtype=out.dtype))

    def l2_norm(self) -> float:
        """Euclidean norm of the update: the square root of the values' float64 sum of squares
        (:attr:`sum_squares` when the decoder gave it). Not ``np.dot``: that goes through
        multi-threaded BLAS, which on a busy host costs milliseconds per call in thread
        wake-ups (measured 7.8 ms against 0.01 ms)."""
        total = self.sum_squares
        if total is None:
            total = float(np.square(self.values, dtype=np.float64).sum())
        return math.sqrt(total)

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
