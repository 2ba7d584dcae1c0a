"""Client update codecs: pure functions from a float32 vector to bytes and back.

Two codecs (byte layouts in docs/wire-format.md, "Codec topk-int8" and "Codec none"):

``topk-int8``
    Top-K by magnitude **per tensor** (at least one entry per tensor), symmetric int8 values
    with one float32 scale per block of kept values, indices as gaps coded with Golomb-Rice
    (unary quotients and fixed-width remainders in two separate bit streams, so that both
    directions are vectorised). Each tensor falls back to dense int8 when that is not larger,
    and tensors with fewer than ``dense_below`` elements always go dense int8. Top-K with
    error feedback follows Stich et al. 2018 / Karimireddy et al. 2019 (the feedback itself
    lives in :mod:`fedmq.feedback`); Golomb 1966 / Rice 1979 for the index code.

``none``
    Dense little-endian float32, for comparison runs.

Decoders check every size against the :class:`~fedmq.params.ParamSpec` before allocating and
raise only :class:`~fedmq.errors.CodecError` (or its subclass :class:`~fedmq.errors.NonFiniteError`).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fedmq.errors import CodecError, NonFiniteError, SpecMismatchError
from fedmq.params import ParamSpec

if TYPE_CHECKING:
    from fedmq.messages import TrainPlan

CODECS = ("topk-int8", "none")

#: First byte of a topk-int8 payload: the layout version of that codec.
TOPK_FORMAT = 1
MODE_DENSE = 0
MODE_SPARSE = 1
#: Tensors at least this large select Top-K from a sampled threshold (see _top_k).
_SAMPLED_TOPK_MIN = 1 << 18
_TOPK_SAMPLE = 1 << 16
#: Largest Golomb-Rice parameter (remainder width in bits).
MAX_RICE_BITS = 30
_U32_MAX = 2**32 - 1
#: Largest scale whose int8 multiples (|q| <= 127) stay finite in float32.
_MAX_SCALE = float(np.float32(np.finfo(np.float32).max / np.float32(127)))
_HEADER = struct.Struct("<BII")      # format, block_size, n_tensors
_SPARSE_HEAD = struct.Struct("<IBI")  # k, rice bits, unary stream bytes


@dataclass(frozen=True)
class CodecConfig:
    """Codec settings (the device side; decoding needs none of them).

    Fields:
        name: ``"topk-int8"`` or ``"none"``.
        density: fraction of entries kept per tensor, in (0, 1]; a tensor of n elements keeps
            ``k = clamp(floor(density * n + 0.5), 1, n)`` entries. Default 1%.
        block_size: kept values per float32 scale, 1..2**32-1. Default 512 (about 0.06 bits
            per kept value of overhead, relative L2 error of the int8 step near 1.5e-2).
        dense_below: tensors with fewer elements go dense (still int8). Default 1024, so that
            biases are sent whole.
        stochastic: stochastic instead of round-to-nearest rounding (unbiased, noisier).

    Raises:
        CodecError: a field is out of range or the codec is unknown.
    """

    name: str = "topk-int8"
    density: float = 0.01
    block_size: int = 512
    dense_below: int = 1024
    stochastic: bool = False

    def __post_init__(self) -> None:
        if self.name not in CODECS:
            raise CodecError(f"unknown codec {self.name!r}, expected one of {CODECS}")
        if not (isinstance(self.density, (int, float)) and 0.0 < self.density <= 1.0):
            raise CodecError(f"codec density must be in (0, 1], got {self.density!r}")
        if not (isinstance(self.block_size, int) and 1 <= self.block_size <= _U32_MAX):
            raise CodecError(f"codec block_size must be in 1..{_U32_MAX}, got {self.block_size!r}")
        if not (isinstance(self.dense_below, int) and self.dense_below >= 0):
            raise CodecError(f"codec dense_below must be >= 0, got {self.dense_below!r}")

    @classmethod
    def from_plan(cls, plan: TrainPlan) -> CodecConfig:
        """Codec settings of a task's :class:`~fedmq.messages.TrainPlan`. Raises CodecError."""
        return cls(name=plan.codec, density=plan.density, block_size=plan.block_size,
                   dense_below=plan.dense_below, stochastic=plan.stochastic)

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


# ----------------------------------------------------------------------------- encoding

def _check_vector(vector: np.ndarray, spec: ParamSpec) -> np.ndarray:
    vec = np.asarray(vector)
    if vec.shape != (spec.size,):
        raise SpecMismatchError(f"vector shape {vec.shape} does not match ParamSpec size ({spec.size},)")
    vec = np.ascontiguousarray(vec, dtype=np.float32)
    if not np.isfinite(vec).all():
        raise NonFiniteError("update vector contains NaN or Inf; refusing to encode it")
    return vec


def _quantize(values: np.ndarray, block: int, stochastic: bool, rng: np.random.Generator | None
              ) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with one scale per block: scale = max|v| / 127, q = round(v / scale)."""
    n = values.shape[0]
    nb = -(-n // block)
    if nb * block != n:
        padded = np.zeros(nb * block, dtype=np.float32)
        padded[:n] = values
    else:
        padded = values
    amax = np.abs(padded).reshape(nb, block).max(axis=1)
    scales = (amax / np.float32(127.0)).astype(np.float32)
    inv = np.zeros_like(scales)
    np.divide(np.float32(1.0), scales, out=inv, where=scales > 0)
    x = (padded.reshape(nb, block) * inv[:, None]).reshape(-1)[:n]
    if stochastic:
        gen = rng if rng is not None else np.random.default_rng()
        x = np.floor(x + gen.random(n, dtype=np.float32))
    else:
        x = np.rint(x)
    q = np.clip(x, -127, 127).astype(np.int8)
    return scales, q


def _top_k(x: np.ndarray, k: int) -> np.ndarray:
    """Sorted int64 positions of the ``k`` largest ``|x|`` (ties broken arbitrarily), 1 <= k < len(x).

    On large tensors a threshold read off a strided sample keeps only a few times k
    candidates, so the selection runs on those instead of the whole tensor (several times
    faster than one argpartition); every entry above the threshold is a candidate, so the
    result is exact, and a threshold that keeps fewer than k falls back to the full selection.
    """
    a = np.abs(x)
    n = a.shape[0]
    if n >= _SAMPLED_TOPK_MIN:
        sample = a[::n // _TOPK_SAMPLE]
        m = sample.shape[0]
        expected = m * k / n
        rank = min(m, int(1.5 * expected + 3.0 * math.sqrt(expected) + 16))
        threshold = np.partition(sample, m - rank)[m - rank]
        cand = np.flatnonzero(a >= threshold)
        if cand.shape[0] >= k:
            if cand.shape[0] > k:
                cand = cand[np.argpartition(a[cand], cand.shape[0] - k)[cand.shape[0] - k:]]
                cand.sort()
            return cand
    idx = np.argpartition(a, n - k)[n - k:]
    idx.sort()
    return idx.astype(np.int64, copy=False)


def _rice_bits(gaps: np.ndarray, n: int) -> tuple[int, int]:
    """Golomb-Rice parameter minimising the coded size of ``gaps``; returns (b, sum of quotients)."""
    k = gaps.shape[0]
    b_max = min(MAX_RICE_BITS, n.bit_length() - 1)
    mean = float(gaps.mean())
    guess = max(0, int(math.log2(mean * math.log(2) + 1.0)))  # near-optimal for geometric gaps
    best: tuple[int, int, int] | None = None
    for b in range(max(0, guess - 2), min(b_max, guess + 2) + 1):
        qsum = int((gaps >> b).sum())
        cost = k * (1 + b) + qsum
        if best is None or cost < best[0]:
            best = (cost, b, qsum)
    if best is None:  # guess above b_max
        qsum = int((gaps >> b_max).sum())
        return b_max, qsum
    return best[1], best[2]


def _rice_encode(gaps: np.ndarray, b: int, qsum: int) -> tuple[bytes, bytes]:
    """Unary stream (q zeros then a one, MSB first) and b-bit remainder stream."""
    k = gaps.shape[0]
    q = gaps >> b
    ubits = np.zeros(qsum + k, dtype=np.uint8)
    ubits[np.cumsum(q + 1) - 1] = 1
    unary = np.packbits(ubits).tobytes()
    if b == 0:
        return unary, b""
    r = gaps & ((1 << b) - 1)
    shifts = np.arange(b - 1, -1, -1, dtype=np.int64)
    rbits = ((r[:, None] >> shifts) & 1).astype(np.uint8)
    return unary, np.packbits(rbits.reshape(-1)).tobytes()


def _dense_record(x: np.ndarray, block: int, stochastic: bool, rng: np.random.Generator | None) -> list[bytes]:
    scales, q = _quantize(x, block, stochastic, rng)
    return [bytes((MODE_DENSE,)), scales.astype("<f4").tobytes(), q.tobytes()]


def _encode_topk(vec: np.ndarray, spec: ParamSpec, config: CodecConfig, rng: np.random.Generator | None) -> bytes:
    block = config.block_size
    parts = [_HEADER.pack(TOPK_FORMAT, block, len(spec.sizes))]
    for off, n in zip(spec.offsets, spec.sizes):
        x = vec[off:off + n]
        k = config.kept(n)
        dense_size = 1 + 4 * -(-n // block) + n
        if n < config.dense_below or k == n:
            parts += _dense_record(x, block, config.stochastic, rng)
            continue
        idx = _top_k(x, k)
        gaps = np.diff(idx, prepend=-1) - 1
        b, qsum = _rice_bits(gaps, n)
        unary_len = -(-(qsum + k) // 8)
        sparse_size = 1 + _SPARSE_HEAD.size + unary_len + -(-(k * b) // 8) + 4 * -(-k // block) + k
        if sparse_size >= dense_size:
            parts += _dense_record(x, block, config.stochastic, rng)
            continue
        unary, rem = _rice_encode(gaps, b, qsum)
        scales, q = _quantize(x[idx], block, config.stochastic, rng)
        parts += [bytes((MODE_SPARSE,)), _SPARSE_HEAD.pack(k, b, len(unary)), unary, rem,
                  scales.astype("<f4").tobytes(), q.tobytes()]
    return b"".join(parts)


def encode(vector: np.ndarray, spec: ParamSpec, config: CodecConfig,
           rng: np.random.Generator | None = None) -> bytes:
    """Compress a client update.

    Args:
        vector: float32 ``(spec.size,)`` (other float dtypes are cast), all finite.
        spec: the model's ParamSpec (tensor boundaries for per-tensor Top-K).
        config: codec settings.
        rng: source of the stochastic-rounding noise (fresh entropy if None); unused otherwise.

    Returns:
        The codec payload (layout in docs/wire-format.md).

    Raises:
        SpecMismatchError: wrong vector shape.
        NonFiniteError: the vector holds NaN or Inf.
    """
    vec = _check_vector(vector, spec)
    if config.name == "none":
        return vec.astype("<f4", copy=False).tobytes()
    return _encode_topk(vec, spec, config, rng)


# ----------------------------------------------------------------------------- decoding

def max_payload_bytes(codec: str, spec: ParamSpec) -> int:
    """Upper bound (bytes) on any valid payload of ``codec`` for ``spec``.

    ``none``: exactly ``4 * size``. ``topk-int8``: ``9 + 16 * T + 10 * size`` (T tensors),
    a loose bound that holds for every block size and Rice parameter.

    Raises:
        CodecError: unknown codec.
    """
    if codec == "none":
        return 4 * spec.size
    if codec == "topk-int8":
        return _HEADER.size + 16 * len(spec.sizes) + 10 * spec.size
    raise CodecError(f"unknown codec {codec!r}, expected one of {CODECS}")


class _Reader:
    __slots__ = ("buf", "pos")

    def __init__(self, buf: memoryview) -> None:
        self.buf = buf
        self.pos = 0

    def take(self, n: int, what: str) -> memoryview:
        end = self.pos + n
        if end > len(self.buf):
            raise CodecError(f"payload truncated: {what} needs {n} bytes at offset {self.pos}, "
                             f"{len(self.buf) - self.pos} left")
        view = self.buf[self.pos:end]
        self.pos = end
        return view

    def unpack(self, st: struct.Struct, what: str) -> tuple[int, ...]:
        return st.unpack(self.take(st.size, what))


def _as_view(payload: object) -> memoryview:
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise CodecError(f"payload must be bytes, got {type(payload).__name__}")
    view = memoryview(payload)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    return view


def _read_scales(rd: _Reader, count: int, where: str) -> np.ndarray:
    scales = np.frombuffer(rd.take(4 * count, f"{where} scales"), dtype="<f4").astype(np.float32)
    # Two reductions check every scale (NaN propagates through min and max and fails both
    # comparisons), cheaper than one array operation per rule; the rules tell failures apart.
    if not (scales.min() >= 0 and scales.max() <= _MAX_SCALE):
        if not np.isfinite(scales).all():
            raise NonFiniteError(f"{where}: NaN or Inf scale")
        if (scales < 0).any():
            raise CodecError(f"{where}: negative scale")
        raise NonFiniteError(f"{where}: scale above {_MAX_SCALE:.4g}, decoded values would be Inf")
    return scales


def _read_values(rd: _Reader, count: int, scales: np.ndarray, block: int, where: str) -> np.ndarray:
    q = np.frombuffer(rd.take(count, f"{where} values"), dtype=np.int8)
    if q.min() == -128:
        raise CodecError(f"{where}: int8 value -128 is outside the symmetric range -127..127")
    vals = q.astype(np.float32)
    nb = scales.shape[0]
    if nb == 1:
        vals *= scales[0]
    else:
        full = (nb - 1) * block
        head = vals[:full].reshape(nb - 1, block)  # a view: scaled in place
        head *= scales[:-1, None]
        vals[full:] *= scales[-1]
    return vals


def _read_remainders(rd: _Reader, k: int, b: int, where: str) -> np.ndarray:
    """The ``k`` b-bit remainders (1 <= b <= 30, packed MSB first), int64 ``(k,)``."""
    nbits = k * b
    stream = rd.take(-(-nbits // 8), f"{where} remainder stream")
    if stream[-1] & ((1 << (-nbits % 8)) - 1):
        raise CodecError(f"{where}: nonzero padding bits in the remainder stream")
    # Remainder i starts at bit i*b: read the big-endian 64-bit word at byte (i*b) >> 3,
    # which holds all of it (b + 7 <= 64), then shift and mask. One take() on an
    # overlapping, unaligned view of the bytes gathers every word at once: about 2.5x
    # faster than unpacking the stream to bits and weighting them, and take() beats fancy
    # indexing on such a view. The sign of a word does not matter: the mask drops the
    # bits an arithmetic shift brings in.
    padded = np.zeros(len(stream) + 8, dtype=np.uint8)  # words starting near the end read zeros
    padded[:len(stream)] = stream
    words_at = np.ndarray((len(stream),), dtype=">i8", buffer=padded, strides=(1,))
    pos = np.arange(0, nbits, b)
    rem = words_at.take(pos >> 3).astype(np.int64)
    pos &= 7
    np.subtract(64 - b, pos, out=pos)
    rem >>= pos
    rem &= (1 << b) - 1
    return rem


def _read_indices(rd: _Reader, n: int, base: int, where: str) -> np.ndarray:
    """Kept positions of one sparse record, plus ``base``: int64 ``(k,)``, strictly increasing."""
    k, b, ulen = rd.unpack(_SPARSE_HEAD, f"{where} sparse header")
    if not 1 <= k <= n:
        raise CodecError(f"{where}: {k} kept values declared, expected 1..{n}")
    if b > MAX_RICE_BITS or (1 << b) > n:
        raise CodecError(f"{where}: Rice parameter {b} out of range for {n} elements")
    # Indices lie in [0, n): the quotients sum to at most (n - k) >> b, so the unary stream
    # has at most k + ((n - k) >> b) bits. Checked before anything is allocated.
    max_ulen = -(-(k + ((n - k) >> b)) // 8)
    if not 1 <= ulen <= max_ulen:
        raise CodecError(f"{where}: unary stream of {ulen} bytes, expected 1..{max_ulen}")
    ubits = np.unpackbits(np.frombuffer(rd.take(ulen, f"{where} unary stream"), dtype=np.uint8))
    # nonzero on a bool view of the same bytes is about 4x faster than on uint8.
    ones = np.flatnonzero(ubits.view(np.bool_))
    if ones.shape[0] != k:
        raise CodecError(f"{where}: unary stream holds {ones.shape[0]} codes, expected {k}")
    if ones[-1] >> 3 != ulen - 1:
        raise CodecError(f"{where}: unary stream has trailing bytes")
    # Code i ends at bit ones[i] after ones[i] - i zeros, the sum of quotients 0..i, so
    # idx[i] = sum_{j<=i} ((q_j << b) + r_j + 1) - 1 = ((ones[i] - i) << b) + i + sum_{j<=i} r_j,
    # computed in place without per-gap temporaries; the global offset goes in the same pass.
    ramp = np.arange(k)
    idx = ones
    idx -= ramp
    idx <<= b
    ramp += base
    idx += ramp
    if b:
        idx += np.cumsum(_read_remainders(rd, k, b, where))
    if idx[-1] >= base + n:
        raise CodecError(f"{where}: index {int(idx[-1]) - base} out of range for {n} elements")
    return idx


def _parse_topk(payload: object, spec: ParamSpec) -> list[tuple[np.ndarray | None, np.ndarray]]:
    """Validate a whole topk-int8 payload; per tensor (positions in the flat vector or None if dense,
    float32 values)."""
    view = _as_view(payload)
    limit = max_payload_bytes("topk-int8", spec)
    if len(view) > limit:
        raise CodecError(f"payload of {len(view)} bytes exceeds the {limit}-byte bound for this ParamSpec")
    rd = _Reader(view)
    fmt, block, ntensors = rd.unpack(_HEADER, "header")
    if fmt != TOPK_FORMAT:
        raise CodecError(f"topk-int8 layout version {fmt}, expected {TOPK_FORMAT}")
    if block < 1:
        raise CodecError("block size 0")
    if ntensors != len(spec.sizes):
        raise CodecError(f"payload has {ntensors} tensors, ParamSpec has {len(spec.sizes)}")
    out: list[tuple[np.ndarray | None, np.ndarray]] = []
    for name, off, n in zip(spec.names, spec.offsets, spec.sizes):
        where = f"tensor {name!r}"
        mode = rd.take(1, f"{where} mode")[0]
        if mode == MODE_DENSE:
            scales = _read_scales(rd, -(-n // block), where)
            out.append((None, _read_values(rd, n, scales, block, where)))
        elif mode == MODE_SPARSE:
            idx = _read_indices(rd, n, off, where)
            k = idx.shape[0]
            scales = _read_scales(rd, -(-k // block), where)
            out.append((idx, _read_values(rd, k, scales, block, where)))
        else:
            raise CodecError(f"{where}: unknown record mode {mode}")
    if rd.pos != len(view):
        raise CodecError(f"{len(view) - rd.pos} trailing bytes after the last tensor")
    return out


def _parse_none(payload: object, spec: ParamSpec) -> np.ndarray:
    view = _as_view(payload)
    if len(view) != 4 * spec.size:
        raise CodecError(f"codec none: payload of {len(view)} bytes, expected {4 * spec.size}")
    vec = np.frombuffer(view, dtype="<f4").astype(np.float32)
    if not np.isfinite(vec).all():
        raise NonFiniteError("codec none: NaN or Inf value")
    return vec


def decode(codec: str, payload: bytes, spec: ParamSpec) -> np.ndarray:
    """Decompress a payload into a dense vector.

    Returns:
        float32 ``(spec.size,)``, zeros where nothing was sent.

    Raises:
        CodecError: unknown codec or malformed payload; NonFiniteError for NaN/Inf scales or values.
    """
    if codec == "none":
        return _parse_none(payload, spec)
    if codec != "topk-int8":
        raise CodecError(f"unknown codec {codec!r}, expected one of {CODECS}")
    out = np.zeros(spec.size, dtype=np.float32)
    for (idx, vals), off, n in zip(_parse_topk(payload, spec), spec.offsets, spec.sizes):
        if idx is None:
            out[off:off + n] = vals
        else:
            out[idx] = vals
    return out


def decode_sparse(codec: str, payload: bytes, spec: ParamSpec) -> SparseUpdate:
    """Decompress a payload into a :class:`SparseUpdate`, validated completely before returning.

    Raises:
        CodecError: unknown codec or malformed payload; NonFiniteError for NaN/Inf scales or values.
    """
    if codec == "none":
        return SparseUpdate(None, _parse_none(payload, spec), spec.size)
    if codec != "topk-int8":
        raise CodecError(f"unknown codec {codec!r}, expected one of {CODECS}")
    parts = _parse_topk(payload, spec)
    nnz = sum(v.shape[0] for _, v in parts)
    values = np.concatenate([v for _, v in parts])
    if nnz == spec.size:
        return SparseUpdate(None, values, spec.size)
    indices = np.concatenate([np.arange(off, off + n, dtype=np.int64) if idx is None else idx
                              for (idx, _), off, n in zip(parts, spec.offsets, spec.sizes)])
    return SparseUpdate(indices, values, spec.size)
