"""Codec ``topk-int8``: Top-K, int8 values, Golomb-Rice coded indices.

Byte layout in docs/wire-format.md, "Codec topk-int8". Top-K by magnitude, recorded **per
tensor** (at least one entry per tensor); the kept entries are chosen across the whole
update (``topk = "global"``, the default) or per tensor (see :class:`TopKParams`), symmetric int8 values with one float32 scale per block of
kept values, indices as gaps coded with Golomb-Rice (unary quotients and fixed-width
remainders in two separate bit streams, so that both directions are vectorised). Each
tensor falls back to dense int8 when that is not larger, and tensors with fewer than
``dense_below`` elements always go dense int8. Top-K with error feedback follows Stich et
al. 2018 / Karimireddy et al. 2019 (the feedback itself lives in :mod:`fedmq.fl.feedback`);
Golomb 1966 / Rice 1979 for the index code.

The decoder checks every size against the :class:`~fedmq.model.params.ParamSpec` before
allocating, applies the spec's refusal rules R26-R42 in their order and raises only
:class:`~fedmq.errors.CodecError` (or its subclass :class:`~fedmq.errors.NonFiniteError`),
with the rule id at the end of the message. Integer arithmetic is in Python ints or int64:
``k * b`` reaches 2**36 and the size bound 2**35 per tensor, beyond 32 bits.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

import fedmq.codecs.kernels as kernels
from fedmq.codecs.base import CodecParams, CodecSpec, SparseUpdate, as_view, check_vector
from fedmq.errors import CodecError, NonFiniteError
from fedmq.model.params import ParamSpec

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
#: Largest scale whose int8 multiples stay finite: 127 * s rounded to binary32 is FLT_MAX
#: for s = 0x7c010203 and +inf for the next float32 up (0x7c010204, float32(FLT_MAX / 127),
#: which is why the limit is a bit pattern rather than a division).
MAX_SCALE_BITS = 0x7C010203
_MAX_SCALE = np.frombuffer(struct.pack("<I", MAX_SCALE_BITS), dtype="<f4")[0].astype(np.float32)
_HEADER = struct.Struct("<BII")      # format, block_size, n_tensors
_SPARSE_HEAD = struct.Struct("<IBI")  # k, rice bits, unary stream bytes

#: How Top-K shares the kept entries among tensors (:attr:`TopKParams.topk`).
TOPK_MODES = ("global", "per-tensor")
#: Default :attr:`TopKParams.dense_below`, in elements: smaller tensors go dense int8 (biases,
#: and the output layers of small models: the digits MLP's 2,560-entry output layer; on the
#: digits demo this closed the last 0.25 pp to dense FedAvg, BENCHMARKS.md). Nothing of the
#: MNIST CNN lies between 1,024 (the previous default) and 4,096.
DENSE_BELOW = 4096


@dataclass(frozen=True)
class TopKParams(CodecParams):
    """The parameters of ``topk-int8`` (the uplink plan's and ``[downlink]``'s by default).

    Fields:
        density: fraction of entries kept per tensor, in (0, 1]; a tensor of n elements keeps
            ``k = clamp(floor(density * n + 0.5), 1, n)`` entries. Default 1%.
        block_size: kept values per float32 scale, 1..2**32-1. Default 512 (about 0.06 bits
            per kept value of overhead, relative L2 error of the int8 step near 1.5e-2).
        dense_below: tensors with fewer elements go dense (still int8), >= 0. Default
            :data:`DENSE_BELOW` (4096 elements), so that biases and small output layers are
            sent whole.
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
        CodecError: a value of the wrong type or out of range.
    """

    density_param: ClassVar[str | None] = "density"
    density: float = 0.01
    block_size: int = 512
    dense_below: int = DENSE_BELOW
    stochastic: bool = False
    topk: str = "global"

    def check(self) -> None:
        if not 0.0 < self.density <= 1.0:
            raise CodecError(f"topk-int8: density must be in (0, 1], got {self.density!r}")
        if not 1 <= self.block_size <= _U32_MAX:
            raise CodecError(f"topk-int8: block_size must be in 1..{_U32_MAX}, got {self.block_size!r}")
        if self.dense_below < 0:
            raise CodecError(f"topk-int8: dense_below must be >= 0, got {self.dense_below!r}")
        if self.topk not in TOPK_MODES:
            raise CodecError(f"topk-int8: topk must be one of {TOPK_MODES}, got {self.topk[:80]!r}")

    def kept(self, n: int) -> int:
        """Number of entries Top-K keeps of a tensor of ``n`` elements."""
        return min(n, max(1, math.floor(self.density * n + 0.5)))


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


def _goes_sparse(n: int, config: TopKParams) -> bool:
    """Whether a tensor of ``n`` elements is a Top-K candidate (else always a dense record)."""
    return not (n < config.dense_below or config.kept(n) == n)


def global_allocation(vec: np.ndarray, spec: ParamSpec, config: TopKParams) -> dict[int, np.ndarray]:
    """Kept positions per sparse-candidate tensor under ``topk = "global"``.

    The budget is the per-tensor rule's, ``K = sum(config.kept(n))`` over the tensors that go
    sparse (``n >= dense_below`` and ``kept(n) < n``); it is spent on the ``K`` entries of
    largest ``|vec|`` among those tensors (ties broken arbitrarily), and a tensor that gets
    none keeps its largest one, so the total is at most ``K + T - 1`` for ``T`` candidates.

    Args:
        vec: float32 ``(spec.size,)``, finite.

    Returns:
        tensor index (ParamSpec order) -> sorted int64 positions within that tensor, at
        least one and at most ``n`` (all ``n``: the encoder writes a dense record). Tensors
        that always go dense are absent.
    """
    cands = [(t, off, n) for t, (off, n) in enumerate(zip(spec.offsets, spec.sizes)) if _goes_sparse(n, config)]
    if not cands:
        return {}
    budget = sum(config.kept(n) for _, _, n in cands)
    flat = np.concatenate([vec[off:off + n] for _, off, n in cands])
    chosen = _top_k(flat, budget)  # budget < flat.size: every candidate keeps kept(n) < n
    starts = np.cumsum([0] + [n for _, _, n in cands])
    cut = np.searchsorted(chosen, starts)
    out: dict[int, np.ndarray] = {}
    for i, (t, off, n) in enumerate(cands):
        idx = chosen[cut[i]:cut[i + 1]] - starts[i]
        out[t] = idx if idx.shape[0] else _top_k(vec[off:off + n], 1)
    return out


def _encode_topk(vec: np.ndarray, spec: ParamSpec, config: TopKParams, rng: np.random.Generator | None) -> bytes:
    block = config.block_size
    parts = [_HEADER.pack(TOPK_FORMAT, block, len(spec.sizes))]
    chosen = global_allocation(vec, spec, config) if config.topk == "global" else None
    for t, (off, n) in enumerate(zip(spec.offsets, spec.sizes)):
        x = vec[off:off + n]
        dense_size = 1 + 4 * -(-n // block) + n
        if not _goes_sparse(n, config) or (chosen is not None and chosen[t].shape[0] == n):
            parts += _dense_record(x, block, config.stochastic, rng)
            continue
        idx = chosen[t] if chosen is not None else _top_k(x, config.kept(n))
        k = idx.shape[0]
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


class _Reader:
    __slots__ = ("buf", "pos")

    def __init__(self, buf: memoryview) -> None:
        self.buf = buf
        self.pos = 0

    def take(self, n: int, what: str) -> memoryview:
        end = self.pos + n
        if end > len(self.buf):
            raise CodecError(f"payload truncated: {what} needs {n} bytes at offset {self.pos}, "
                             f"{len(self.buf) - self.pos} left (rule R27)")
        view = self.buf[self.pos:end]
        self.pos = end
        return view

    def unpack(self, st: struct.Struct, what: str) -> tuple[int, ...]:
        return st.unpack(self.take(st.size, what))


def _read_scales(rd: _Reader, count: int, where: str) -> np.ndarray:
    scales = np.frombuffer(rd.take(4 * count, f"{where} scales"), dtype="<f4").astype(np.float32)
    # Two reductions check every scale (NaN propagates through min and max and fails both
    # comparisons), cheaper than one array operation per rule; the rules tell failures apart.
    if not (scales.min() >= 0 and scales.max() <= _MAX_SCALE):
        if not np.isfinite(scales).all():
            raise NonFiniteError(f"{where}: NaN or Inf scale (rule R38)")
        if (scales < 0).any():
            raise CodecError(f"{where}: negative scale (rule R39)")
        raise NonFiniteError(f"{where}: scale above {float(_MAX_SCALE):.8g} (0x{MAX_SCALE_BITS:08x}), decoded "
                             f"values would be Inf (rule R40)")
    return scales


def _read_values(rd: _Reader, count: int, scales: np.ndarray, block: int, where: str) -> np.ndarray:
    q = np.frombuffer(rd.take(count, f"{where} values"), dtype=np.int8)
    if q.min() == -128:
        raise CodecError(f"{where}: int8 value -128 is outside the symmetric range -127..127 (rule R41)")
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
        raise CodecError(f"{where}: nonzero padding bits in the remainder stream (rule R36)")
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
        raise CodecError(f"{where}: {k} kept values declared, expected 1..{n} (rule R32)")
    if b > MAX_RICE_BITS or (1 << b) > n:
        raise CodecError(f"{where}: Rice parameter {b} out of range for {n} elements (rule R33)")
    # Indices lie in [0, n): the quotients sum to at most (n - k) >> b, so the unary stream
    # has at most k + ((n - k) >> b) bits. Checked before anything is allocated.
    max_ulen = -(-(k + ((n - k) >> b)) // 8)
    if not 1 <= ulen <= max_ulen:
        raise CodecError(f"{where}: unary stream of {ulen} bytes, expected 1..{max_ulen} (rule R34)")
    ubits = np.unpackbits(np.frombuffer(rd.take(ulen, f"{where} unary stream"), dtype=np.uint8))
    # nonzero on a bool view of the same bytes is about 4x faster than on uint8.
    ones = np.flatnonzero(ubits.view(np.bool_))
    if ones.shape[0] != k:
        raise CodecError(f"{where}: unary stream holds {ones.shape[0]} codes, expected {k} (rule R35)")
    if ones[-1] >> 3 != ulen - 1:
        raise CodecError(f"{where}: unary stream has trailing bytes (rule R35)")
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
        # torch's int64 prefix sum is about 5x faster than numpy's scalar loop (6.5 vs
        # 35.6 us for 16k remainders, one thread): the largest single step of the decode.
        idx += torch.cumsum(torch.from_numpy(_read_remainders(rd, k, b, where)), 0).numpy()
    if idx[-1] >= base + n:
        raise CodecError(f"{where}: index {int(idx[-1]) - base} out of range for {n} elements (rule R37)")
    return idx


def _parse_topk(payload: object, spec: ParamSpec) -> list[tuple[np.ndarray | None, np.ndarray]]:
    """Validate a whole topk-int8 payload; per tensor (positions in the flat vector or None if dense,
    float32 values)."""
    view = as_view(payload)
    limit = _max_payload_bytes(spec)
    if len(view) > limit:
        raise CodecError(f"payload of {len(view)} bytes exceeds the {limit}-byte bound for this ParamSpec (rule R26)")
    rd = _Reader(view)
    fmt, block, ntensors = rd.unpack(_HEADER, "header")
    if fmt != TOPK_FORMAT:
        raise CodecError(f"topk-int8 layout version {fmt}, expected {TOPK_FORMAT} (rule R28)")
    if block < 1:
        raise CodecError("block size 0 (rule R29)")
    if ntensors != len(spec.sizes):
        raise CodecError(f"payload has {ntensors} tensors, ParamSpec has {len(spec.sizes)} (rule R30)")
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
            raise CodecError(f"{where}: unknown record mode {mode} (rule R31)")
    if rd.pos != len(view):
        raise CodecError(f"{len(view) - rd.pos} trailing bytes after the last tensor (rule R42)")
    return out


#: A sparse record as the fast path walks it: (start in the update's index array, k, Rice
#: parameter b, offset of its tensor in the flat vector, tensor size n, unary stream start
#: and end byte in the payload; the remainder stream follows).
_Record = tuple[int, int, int, int, int, int, int]


def _decode_valid(view: memoryview, spec: ParamSpec) -> SparseUpdate | None:
    """The fast path of :meth:`TopKInt8.decode_sparse`: the decoded update when ``view``
    passes every rule, None when any check fails (the caller then runs :func:`_parse_topk`,
    which finds the first rule broken in the spec's order and raises it).

    With numba installed (:mod:`fedmq.codecs.kernels`) the whole payload is walked and
    decoded by compiled loops (:func:`_decode_compiled`); otherwise by
    :func:`_decode_numpy`. Both give the same update, bit for bit."""
    kern = kernels.get()
    if kern is not None:
        return _decode_compiled(view, spec, kern)
    return _decode_numpy(view, spec)


#: Per ParamSpec hash: its tensor offsets and sizes as int64 arrays, for the kernels.
_SPEC_ARRAYS: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def _decode_compiled(view: memoryview, spec: ParamSpec, kern: dict) -> SparseUpdate | None:
    """:func:`_decode_valid` by the compiled kernels: one walk of the record layout (size
    rules, nothing allocated before it passes), then one pass that decodes positions,
    scales and values into arrays of the walked size, then the values' float64 sum of
    squares (:attr:`SparseUpdate.sum_squares`, for the L2 norm check)."""
    arrays = _SPEC_ARRAYS.get(spec.hash)
    if arrays is None:
        if len(_SPEC_ARRAYS) >= 64:  # one entry per model a process decodes; bounded
            _SPEC_ARRAYS.clear()
        arrays = _SPEC_ARRAYS[spec.hash] = (np.asarray(spec.offsets, dtype=np.int64),
                                            np.asarray(spec.sizes, dtype=np.int64))
    offsets, sizes = arrays
    raw = np.frombuffer(view, dtype=np.uint8)
    rec = np.empty((sizes.shape[0], 7), dtype=np.int64)
    nnz = kern["topk_layout"](raw, sizes, rec, MAX_RICE_BITS)
    if nnz < 0:
        return None
    dense = nnz == spec.size
    indices = np.empty(0 if dense else nnz, dtype=np.int64)
    values = np.empty(nnz, dtype=np.float32)
    block = _HEADER.unpack_from(view, 0)[1]
    if not kern["topk_fill"](raw, offsets, sizes, rec, block, _MAX_SCALE, indices, values):
        return None
    # A separate call: inlined into topk_fill, the sum ran some 4x slower (not vectorized).
    return SparseUpdate(None if dense else indices, values, spec.size, kern["sum_squares"](values))


def _decode_numpy(view: memoryview, spec: ParamSpec) -> SparseUpdate | None:
    """:func:`_decode_valid` in NumPy.

    :func:`_parse_topk` spends about ten NumPy calls per tensor on its values and some
    thirty per sparse record on its positions, which on the MNIST CNN (five of its eight
    tensors under 1,000 values, two of its three sparse records under 600 positions) cost
    more than the data. Here one Python pass walks the record structure (the size rules
    R27-R34 and R36 as integer checks), each sparse record's positions are decoded with
    about half the passes over them (:func:`_decode_positions`) straight into the update's
    index array, and the scales and values of all tensors are checked and scaled in one
    batch. The arithmetic is exact (integers) or the same (values), so the result is
    bit-identical to the sequential decode."""
    size = len(view)
    if size < _HEADER.size:
        return None
    fmt, block, ntensors = _HEADER.unpack_from(view, 0)
    if fmt != TOPK_FORMAT or block < 1 or ntensors != len(spec.sizes):
        return None
    pos = _HEADER.size
    records: list[_Record] = []
    dense: list[tuple[int, int, int]] = []   # (start in the index array, tensor offset, n)
    scale_at: list[tuple[int, int]] = []     # (byte offset, scale count) per tensor
    value_at: list[tuple[int, int]] = []     # (byte offset, value count) per tensor
    per_block: list[int] = []                # values each scale covers, all tensors in order
    nnz = 0
    for off, n in zip(spec.offsets, spec.sizes):
        if pos >= size:
            return None
        mode = view[pos]
        pos += 1
        if mode == MODE_DENSE:
            count = n
            dense.append((nnz, off, n))
        elif mode == MODE_SPARSE:
            if pos + _SPARSE_HEAD.size > size:
                return None
            count, b, ulen = _SPARSE_HEAD.unpack_from(view, pos)
            pos += _SPARSE_HEAD.size
            # R32-R34 as in _read_indices
            if not 1 <= count <= n or b > MAX_RICE_BITS or (1 << b) > n:
                return None
            if not 1 <= ulen <= -(-(count + ((n - count) >> b)) // 8):
                return None
            nbits = count * b
            rlen = -(-nbits // 8)
            # R36: the remainder stream's padding bits are zero.
            if nbits % 8 and pos + ulen + rlen <= size and view[pos + ulen + rlen - 1] & ((1 << (-nbits % 8)) - 1):
                return None
            records.append((nnz, count, b, off, n, pos, pos + ulen))
            pos += ulen + rlen
        else:
            return None
        nb = -(-count // block)
        scale_at.append((pos, nb))
        pos += 4 * nb
        value_at.append((pos, count))
        pos += count
        per_block += [block] * (nb - 1)
        per_block.append(count - (nb - 1) * block)
        nnz += count
    if pos != size:
        return None
    raw = np.frombuffer(view, dtype=np.uint8)
    indices = None if nnz == spec.size else np.empty(nnz, dtype=np.int64)
    if records and not _decode_positions(raw, records, indices):
        return None
    scales = np.concatenate([raw[at:at + 4 * nb] for at, nb in scale_at]).view("<f4")
    if not (scales.min() >= 0 and scales.max() <= _MAX_SCALE):
        return None
    q = np.concatenate([raw[at:at + count] for at, count in value_at]).view(np.int8)
    if q.min() == -128:
        return None
    values = q.astype(np.float32)
    values *= np.repeat(scales, per_block)
    if indices is None:
        return SparseUpdate(None, values, spec.size)
    for at, off, n in dense:
        indices[at:at + n] = np.arange(off, off + n, dtype=np.int64)
    return SparseUpdate(indices, values, spec.size)


#: Right shifts that bring remainder j of a group of 8 to the low bits, per Rice parameter
#: b in 1..8: a group is 8 * b bits, b whole bytes, read as the big-endian 64-bit word at
#: its first byte, where remainder j ends at bit 64 - b * (j + 1). (b = 0: no remainders.)
_GROUP_SHIFTS = [np.zeros(8, dtype=np.uint64)] + [(64 - b * np.arange(1, 9)).astype(np.uint64) for b in range(1, 9)]


def _remainders(raw: np.ndarray, start: int, k: int, b: int) -> np.ndarray:
    """The ``k`` b-bit remainders (1 <= b <= 30) of the stream at byte ``start`` of ``raw``
    (uint8, at least 7 bytes past the stream's end), as :func:`_read_remainders` reads
    them: int64 ``(k,)``, a fresh array.

    For b <= 8 (densities above about 0.3 %) the stream is read 8 remainders at a time,
    one 64-bit word per group and one shift per remainder; above, as in
    :func:`_read_remainders`, one unaligned word per remainder (unsigned here, so that a
    left shift drops the bits before it and a logical right shift those after it)."""
    if b <= 8:
        words = np.ndarray((-(-k // 8),), dtype=">u8", buffer=raw, offset=start, strides=(b,)).astype(np.uint64)
        rem = np.right_shift(words[:, None], _GROUP_SHIFTS[b]).reshape(-1)[:k]
        rem &= (1 << b) - 1
    else:
        bitpos = np.arange(8 * start, 8 * start + k * b, b)
        rem = np.ndarray((raw.shape[0] - 7,), dtype=">u8", buffer=raw, strides=(1,)).take(bitpos >> 3)
        rem = rem.astype(np.uint64)
        bitpos &= 7
        rem <<= bitpos.view(np.uint64)
        rem >>= 64 - b
    return rem.view(np.int64)


def _decode_positions(raw: np.ndarray, records: list[_Record], out: np.ndarray | None) -> bool:
    """Positions of every sparse record of a payload, checked against rules R35-R37; False
    when one fails. ``raw``: the payload, uint8. ``records``: its sparse records in order
    (see :data:`_Record`). ``out``: int64, the update's index array, each record's
    positions written from its start (None: checks only).

    The formula of :func:`_read_indices` rearranged to take fewer passes over the k
    positions: with ``ones[j]`` the bit where code j ends in the record's unary stream,
    ``r[j]`` its remainder and ``m = 2**b - 1``, position j is
    ``offset + (ones[j] << b) + sum_{i<=j} (r[i] - m) + m``, so after the remainders are
    read it is one shift, one prefix sum and one add."""
    last = records[-1]
    if raw.shape[0] - (last[6] + -(-(last[1] * last[2]) // 8)) < 7:
        # Remainders are read as 64-bit words, up to 7 bytes past their stream.
        raw = np.concatenate([raw, np.zeros(7, dtype=np.uint8)])
    for at, k, b, off, n, us, ue in records:
        ones = np.flatnonzero(np.unpackbits(raw[us:ue]).view(np.bool_))
        if ones.shape[0] != k or ones[-1] >> 3 != ue - us - 1:  # R35
            return False
        if b:
            part = _remainders(raw, ue, k, b)
            m = (1 << b) - 1
            part -= m
            part[0] += off + m
            # torch's int64 prefix sum is about 5x faster than numpy's scalar loop.
            torch.from_numpy(part).cumsum_(0)
            ones <<= b
            ones += part
        else:
            ones += off
        if ones[-1] >= off + n:  # R37
            return False
        if out is not None:
            out[at:at + k] = ones
    return True


def _max_payload_bytes(spec: ParamSpec) -> int:
    return _HEADER.size + 16 * len(spec.sizes) + 10 * spec.size


class TopKInt8:
    """The ``topk-int8`` codec (see the module docstring)."""

    name = "topk-int8"
    Params = TopKParams

    def encode(self, vector: np.ndarray, spec: ParamSpec, config: CodecSpec,
               rng: np.random.Generator | None = None) -> bytes:
        """Compress float32 ``(spec.size,)``.

        Args:
            vector: the update (other float dtypes are cast), all finite.
            spec: tensor boundaries for per-tensor Top-K.
            config: this codec with its :class:`TopKParams` (density, block size, dense
                threshold, rounding, Top-K mode).
            rng: source of the stochastic-rounding noise (fresh entropy if None); unused otherwise.

        Raises:
            SpecMismatchError: wrong vector shape. NonFiniteError: NaN or Inf in the vector.
        """
        return _encode_topk(check_vector(vector, spec), spec, config.params, rng)

    def decode_sparse(self, payload: bytes | memoryview, spec: ParamSpec) -> SparseUpdate:
        """Decode and validate every index, scale and value before returning.

        Raises:
            CodecError: malformed payload. NonFiniteError: NaN or Inf scales or values.
        """
        view = as_view(payload)
        if len(view) <= _max_payload_bytes(spec):
            fast = _decode_valid(view, spec)
            if fast is not None:
                return fast
        parts = _parse_topk(view, spec)
        nnz = sum(v.shape[0] for _, v in parts)
        values = np.concatenate([v for _, v in parts])
        if nnz == spec.size:
            return SparseUpdate(None, values, spec.size)
        indices = np.concatenate([np.arange(off, off + n, dtype=np.int64) if idx is None else idx
                                  for (idx, _), off, n in zip(parts, spec.offsets, spec.sizes)])
        return SparseUpdate(indices, values, spec.size)

    def max_payload_bytes(self, spec: ParamSpec) -> int:
        """``9 + 16 * T + 10 * size`` bytes (T tensors): a loose bound that holds for every
        block size and Rice parameter."""
        return _max_payload_bytes(spec)
