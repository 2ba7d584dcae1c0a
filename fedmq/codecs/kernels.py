"""Compiled inner loops of the coordinator's ingest, when numba is installed.

The coordinator decodes, checks and adds every client update it accepts. In NumPy the
topk-int8 decode takes some thirty array calls per sparse record and the scatter-add into
the float64 accumulator a gather and a scatter per entry; each call's overhead is larger
than its data on the MNIST CNN's 18,000 kept entries. Here both are one pass each, compiled
by numba (a ``coordinator`` extra: the device install stays without it). The coordinator turns
them on (:func:`enable`); without numba, with the environment variable
``FEDMQ_KERNELS=numpy``, or on a device, every caller keeps its NumPy path.

Both kernels give the same results bit for bit as the NumPy paths (integers are exact;
``values = float32(q) * scale`` in float32 and ``out[i] + float64(v) * w`` in the
accumulator's dtype are the same IEEE operations in the same order; no fast-math). The one
exception is the update's float64 sum of squares (its squared L2 norm), which the compiled
decode also gives (:func:`sum_squares`): summed vectorized, in another order than NumPy's
pairwise sum, it agrees with it to within a few ulps (relative 1e-15 on the MNIST CNN's
updates; the device's clipping margin, :data:`fedmq.privacy.clipping._MARGIN`, is 1e-5). The
decode kernel applies the size and value rules of docs/wire-format.md (R27-R41) and only
answers "valid, here is the update" or "not valid": on "not valid" the caller runs the
strict reader, which names the first rule broken in the spec's order. Every read is bounds
checked by the layout walk before it happens, so a damaged payload cannot read outside its
buffer.

Compiled code is cached next to this file (``__pycache__``, numba's ``cache=True``), so a
process compiles once per installation (about 1 s) and later processes load it.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np

_lock = threading.Lock()
_built: dict[str, Any] | None = None
_compiled: dict[str, Any] | None = None  # _built while turned on
#: Why the kernels are off after :func:`enable` (None while they are on).
disabled_reason: str | None = None


def _build() -> dict[str, Any]:
    import numba
    from numba.cpython.unsafe.numbers import leading_zeros  # LLVM's ctlz

    # The GIL is kept: the coordinator's MQTT network thread would take it during each call and
    # the message loop wait for it afterwards. Through mosquitto that handover cost more than
    # the overlap gave (1,664 against 1,833 updates a second, medians of 3 runs of 3,000).
    jit = numba.njit(cache=True, boundscheck=False)

    @numba.njit(cache=True, boundscheck=False, fastmath={"reassoc"})
    def sum_squares(values: np.ndarray) -> float:
        """``sum(float64(v) ** 2)`` over float32 ``values`` ``(n,)``, reassociated so that it
        runs vectorized (7x faster than NumPy's ``np.square(v, dtype=float64).sum()``, whose
        pairwise order it does not keep: the two agree to within a few ulps)."""
        total = 0.0
        for j in range(values.shape[0]):
            x = np.float64(values[j])
            total += x * x
        return total

    @jit
    def topk_layout(raw: np.ndarray, sizes: np.ndarray, rec: np.ndarray, max_rice: int) -> int:
        """Walk a topk-int8 payload's records (docs/wire-format.md, rules R27-R34, R36, R42).

        ``raw``: the payload, uint8 ``(bytes,)``; ``sizes``: int64 ``(T,)`` tensor sizes;
        ``rec``: int64 ``(T, 7)``, written: per tensor (mode, count, Rice bits, unary start,
        unary end, scale start, value start), byte offsets in ``raw``; ``max_rice``: the
        largest Rice parameter. Returns the number of kept values, or -1 when a rule fails."""
        size = raw.shape[0]
        if size < 9:
            return -1
        fmt = raw[0]
        block = np.int64(raw[1]) | (np.int64(raw[2]) << 8) | (np.int64(raw[3]) << 16) | (np.int64(raw[4]) << 24)
        ntensors = np.int64(raw[5]) | (np.int64(raw[6]) << 8) | (np.int64(raw[7]) << 16) | (np.int64(raw[8]) << 24)
        if fmt != 1 or block < 1 or ntensors != sizes.shape[0]:
            return -1
        pos = np.int64(9)
        nnz = np.int64(0)
        for t in range(sizes.shape[0]):
            n = sizes[t]
            if pos >= size:
                return -1
            mode = raw[pos]
            pos += 1
            b = np.int64(0)
            us = np.int64(0)
            ue = np.int64(0)
            if mode == 0:
                count = n
            elif mode == 1:
                if pos + 9 > size:
                    return -1
                count = (np.int64(raw[pos]) | (np.int64(raw[pos + 1]) << 8) | (np.int64(raw[pos + 2]) << 16)
                         | (np.int64(raw[pos + 3]) << 24))
                b = np.int64(raw[pos + 4])
                ulen = (np.int64(raw[pos + 5]) | (np.int64(raw[pos + 6]) << 8) | (np.int64(raw[pos + 7]) << 16)
                        | (np.int64(raw[pos + 8]) << 24))
                pos += 9
                if count < 1 or count > n or b > max_rice or (np.int64(1) << b) > n:
                    return -1
                if ulen < 1 or ulen > (count + ((n - count) >> b) + 7) // 8:
                    return -1
                nbits = count * b
                rlen = (nbits + 7) // 8
                if nbits % 8 and pos + ulen + rlen <= size:
                    if raw[pos + ulen + rlen - 1] & ((1 << (8 - nbits % 8)) - 1):
                        return -1
                us = pos
                ue = pos + ulen
                pos += ulen + rlen
            else:
                return -1
            nb = (count + block - 1) // block
            rec[t, 0] = mode
            rec[t, 1] = count
            rec[t, 2] = b
            rec[t, 3] = us
            rec[t, 4] = ue
            rec[t, 5] = pos
            pos += 4 * nb
            rec[t, 6] = pos
            pos += count
            nnz += count
        if pos != size:
            return -1
        return nnz

    @jit
    def topk_fill(raw: np.ndarray, offsets: np.ndarray, sizes: np.ndarray, rec: np.ndarray, block: int,
                  max_scale: np.float32, indices: np.ndarray, values: np.ndarray) -> bool:
        """Decode the records walked by ``topk_layout`` (rules R35, R37, R38-R41).

        ``offsets``, ``sizes``: int64 ``(T,)``; ``rec``: ``topk_layout``'s; ``block``: values
        per scale; ``max_scale``: float32, the largest valid scale; ``values``: float32
        ``(nnz,)``, written; ``indices``: int64 ``(nnz,)`` flat positions, written, or ``(0,)``
        when every tensor is dense. Returns False when a rule fails (the arrays are then partly
        written and to be dropped).

        A sparse record's unary stream is read 64 bits at a time, big-endian, and each code's
        end found by counting leading zeros (one pass per code, not per bit or per byte); its
        remainders come from a 64-bit bit buffer refilled 32 bits at a time (a byte at a time
        at the stream's end), never past the remainder stream. The values' loop has no early
        exit, so it runs vectorized; R41 is checked on the smallest value afterwards."""
        write = indices.shape[0] > 0
        at = 0
        word = np.empty(1, dtype=np.uint32)
        as_float = word.view(np.float32)
        top = np.uint64(0x8000000000000000)
        for t in range(sizes.shape[0]):
            off = offsets[t]
            n = sizes[t]
            count = rec[t, 1]
            if rec[t, 0] == 1:
                b = rec[t, 2]
                us = rec[t, 3]
                ue = rec[t, 4]
                mask = (np.uint64(1) << np.uint64(b)) - np.uint64(1)
                rend = ue + (count * b + 7) // 8  # the remainder stream's end
                p = ue  # next remainder byte to load
                acc = np.uint64(0)  # bit buffer: its low nbit bits are the next remainders
                nbit = np.int64(0)
                found = np.int64(0)
                prev = off - 1
                last_one = np.int64(8 * us - 1)  # bit position of the previous code's end
                i = us
                while i < ue:
                    nw = min(8, ue - i)
                    if nw == 8:
                        w = ((np.uint64(raw[i]) << np.uint64(56)) | (np.uint64(raw[i + 1]) << np.uint64(48))
                             | (np.uint64(raw[i + 2]) << np.uint64(40)) | (np.uint64(raw[i + 3]) << np.uint64(32))
                             | (np.uint64(raw[i + 4]) << np.uint64(24)) | (np.uint64(raw[i + 5]) << np.uint64(16))
                             | (np.uint64(raw[i + 6]) << np.uint64(8)) | np.uint64(raw[i + 7]))
                    else:  # the stream's last bytes, zero-padded
                        w = np.uint64(0)
                        for k in range(nw):
                            w = (w << np.uint64(8)) | np.uint64(raw[i + k])
                        w <<= np.uint64(8 * (8 - nw))
                    base = 8 * i
                    while w != 0:  # each set bit ends one code
                        lead = np.int64(leading_zeros(w))
                        w ^= top >> np.uint64(lead)
                        one = base + lead
                        if found == count:
                            return False
                        if nbit < b:  # nbit < b <= 30: 32 more bits fit
                            if p + 4 <= rend:
                                acc = ((acc << np.uint64(32)) | (np.uint64(raw[p]) << np.uint64(24))
                                       | (np.uint64(raw[p + 1]) << np.uint64(16))
                                       | (np.uint64(raw[p + 2]) << np.uint64(8)) | np.uint64(raw[p + 3]))
                                p += 4
                                nbit += 32
                            else:  # the stream's last bytes
                                while nbit <= 56 and p < rend:
                                    acc = (acc << np.uint64(8)) | np.uint64(raw[p])
                                    p += 1
                                    nbit += 8
                        nbit -= b
                        r = np.int64((acc >> np.uint64(nbit)) & mask)
                        prev += ((one - last_one - 1) << b) + r + 1
                        last_one = one
                        if write:
                            indices[at + found] = prev
                        found += 1
                    i += nw
                if found != count or (last_one >> 3) != ue - 1:  # R35
                    return False
                if prev >= off + n:  # R37
                    return False
            elif write:
                for j in range(n):
                    indices[at + j] = off + j
            # scales (little-endian float32, one per block of values) and int8 values
            sat = rec[t, 5]
            q = raw[rec[t, 6]:rec[t, 6] + count].view(np.int8)
            low = np.int8(0)
            for j in range((count + block - 1) // block):
                word[0] = (np.uint32(raw[sat + 4 * j]) | (np.uint32(raw[sat + 4 * j + 1]) << 8)
                           | (np.uint32(raw[sat + 4 * j + 2]) << 16) | (np.uint32(raw[sat + 4 * j + 3]) << 24))
                scale = as_float[0]
                if not (scale >= 0 and scale <= max_scale):  # R38-R40 (NaN fails both)
                    return False
                lo = j * block
                end = min(count, lo + block)
                src = q[lo:end]
                dst = values[at + lo:at + end]
                for v in range(end - lo):
                    x = src[v]
                    low = min(low, x)
                    dst[v] = np.float32(x) * scale
            if low == -128:  # R41
                return False
            at += count
        return True

    @jit
    def scatter_add(out: np.ndarray, indices: np.ndarray, values: np.ndarray, weight: Any) -> bool:
        """``out[indices] += values * weight`` in ``out``'s dtype. ``out``: float32 or float64
        ``(d,)``; ``indices``: int64 ``(nnz,)``; ``values``: float32 ``(nnz,)``; ``weight``:
        a scalar of ``out``'s dtype. Returns False, with nothing written, when an index lies
        outside ``out``."""
        lo = np.int64(0)
        hi = np.int64(-1)
        for j in range(indices.shape[0]):  # no early exit: vectorized (2.5 us against 7)
            i = indices[j]
            lo = min(lo, i)
            hi = max(hi, i)
        if lo < 0 or hi >= out.shape[0]:
            return False
        for j in range(indices.shape[0]):
            out[indices[j]] += values[j] * weight
        return True

    return {"topk_layout": topk_layout, "topk_fill": topk_fill, "scatter_add": scatter_add,
            "sum_squares": sum_squares}


def enable() -> dict[str, Any] | None:
    """Turn the kernels on for this process, when numba is installed and ``FEDMQ_KERNELS``
    is not ``numpy``; the coordinator's update checks do (:class:`fedmq.fl.rounds.UpdateChecks`),
    a device does not (it decodes one downlink per round, and importing numba costs about
    a second). Compiles on first use (cached on disk); thread-safe.

    Returns:
        The kernels (``topk_layout``, ``topk_fill``, ``scatter_add``, ``sum_squares``), or
        None with the reason in :data:`disabled_reason`.
    """
    global _built, _compiled, disabled_reason
    with _lock:
        if _built is None:
            if os.environ.get("FEDMQ_KERNELS", "numba") == "numpy":
                disabled_reason = "FEDMQ_KERNELS=numpy"
                return None
            try:
                _built = _build()
            except ImportError as exc:
                disabled_reason = (f"numba is not installed, or lacks what the kernels use ({exc}); "
                                   "the coordinator extra installs it")
                return None
        _compiled, disabled_reason = _built, None
    return _compiled


def get() -> dict[str, Any] | None:
    """The kernels when :func:`enable` turned them on in this process, else None (callers
    then take their NumPy paths)."""
    return _compiled


def disable() -> None:
    """Back to the NumPy paths in this process (tests and benchmarks that compare both)."""
    global _compiled, disabled_reason
    with _lock:
        _compiled, disabled_reason = None, "turned off"
