"""Downlink compression with server-side error feedback, and the catch-up rule of the version chain.

The coordinator keeps two float32 vectors: the **published** global model ``p`` (what every
device holds, bit for bit) and the server **residual** ``r`` (what the downlink codec has
not sent yet). Each round the server model is ``x = p + r``; the server optimizer steps it
to ``x'``; the codec compresses the change the server wants devices to see,
``target = x' - p``; the published model moves by exactly what devices will decode::

    sent = decode(encode(x' - p))      # zeros where nothing was sent
    p'   = p + sent                    # float32, element by element, round to nearest even
    r'   = x' - p'                     # everything the codec dropped, quantization included

This is error feedback on the server (Sattler et al. 2019, "Robust and
Communication-Efficient Federated Learning from Non-IID Data", arXiv 1903.02891, STC;
Gruntkowska et al. 2023, "EF21-P and Friends", arXiv 2209.15218): compressing the
difference between the server's model and the published one instead of the step alone
keeps ``p`` from drifting away from ``x`` by accumulated rounding. Over any number of
versions ``sum(sent) + r = sum of the optimizer's steps`` (up to float32 rounding).

The float32 arithmetic a device repeats is :func:`apply_delta`: a dense IEEE 754 binary32
addition of the decoded vector (zeros where nothing was sent), so that ``-0.0 + 0.0``
rounds the same way on both sides. :func:`params_sha256` names each version's vector.
Everything here is pure (no I/O); wire layouts are in :mod:`fedmq.fl.chain`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from fedmq.codecs import CodecSpec, decode, encode
from fedmq.errors import NonFiniteError, SpecMismatchError
from fedmq.model.params import ParamSpec


def params_sha256(vector: np.ndarray) -> str:
    """SHA-256 (64 lower-case hex chars) of a parameter vector's little-endian float32 bytes, in
    ParamSpec order. Raises SpecMismatchError when ``vector`` is not float32 and one-dimensional."""
    vec = np.asarray(vector)
    if vec.dtype != np.float32 or vec.ndim != 1:
        raise SpecMismatchError(f"parameter vector must be float32 (d,), got {vec.dtype} {vec.shape}")
    return hashlib.sha256(np.ascontiguousarray(vec, dtype="<f4").tobytes()).hexdigest()


def apply_delta(published: np.ndarray, codec: str, payload: bytes, spec: ParamSpec) -> np.ndarray:
    """The next published model: ``published + decode(payload)``, a new float32 ``(spec.size,)``.

    The addition is dense float32 (round to nearest even), the same on the coordinator and on
    every device; so is the decoding (:func:`fedmq.codecs.decode`).

    Raises:
        CodecError / NonFiniteError: malformed payload. SpecMismatchError: wrong vector shape.
        NonFiniteError: the sum overflows.
    """
    base = np.asarray(published)
    if base.dtype != np.float32 or base.shape != (spec.size,):
        raise SpecMismatchError(f"published model must be float32 ({spec.size},), got {base.dtype} {base.shape}")
    out = base + decode(codec, payload, spec)
    if not np.isfinite(out).all():
        raise NonFiniteError("applying the model delta overflowed float32")
    return out


@dataclass(frozen=True)
class DownlinkStep:
    """One compressed version: ``payload`` (codec bytes), ``published`` (the new float32
    ``(d,)`` model devices will hold), ``residual`` (float32 ``(d,)``, what stays behind) and
    ``sent`` (float32 ``(d,)``, the decoded delta)."""

    payload: bytes
    published: np.ndarray
    residual: np.ndarray
    sent: np.ndarray


def compress_step(published: np.ndarray, server_model: np.ndarray, spec: ParamSpec,
                  config: CodecSpec) -> DownlinkStep:
    """Compress the move from ``published`` to ``server_model`` (both float32 ``(spec.size,)``).

    Args:
        published: the model devices hold now (``p``).
        server_model: the server optimizer's model after its step (``x'``), finite.
        spec: tensor boundaries (the codec selects Top-K per tensor).
        config: the downlink codec and its parameters (``[downlink]``, scheduled for the round).

    Returns:
        :class:`DownlinkStep` with ``published = apply_delta(p, ...)`` bit for bit and
        ``residual = x' - published``.

    Raises:
        SpecMismatchError: wrong shapes. NonFiniteError: NaN/Inf in ``server_model``.
    """
    p = np.asarray(published)
    x = np.asarray(server_model)
    for name, arr in (("published model", p), ("server model", x)):
        if arr.dtype != np.float32 or arr.shape != (spec.size,):
            raise SpecMismatchError(f"{name} must be float32 ({spec.size},), got {arr.dtype} {arr.shape}")
    payload = encode(x - p, spec, config)
    new = apply_delta(p, config.name, payload, spec)
    return DownlinkStep(payload, new, x - new, new - p)


def server_model(published: np.ndarray, residual: np.ndarray) -> np.ndarray:
    """The server optimizer's model ``x = p + r`` (float32, a new array). Raises
    SpecMismatchError when the shapes differ."""
    if np.shape(published) != np.shape(residual):
        raise SpecMismatchError(f"published model {np.shape(published)} and residual {np.shape(residual)} differ")
    return np.asarray(published, dtype=np.float32) + np.asarray(residual, dtype=np.float32)


@dataclass(frozen=True)
class CatchUp:
    """What a device downloads to get from the version it holds to ``target``.

    Attributes:
        snapshot: version of the full snapshot to fetch first, or None (deltas only).
        deltas: versions whose delta blobs are applied in this order (ascending, contiguous).
        cost: bytes to download (blob sizes, as announced in the chain).
        reason: why this path (for the log).
    """

    snapshot: int | None
    deltas: tuple[int, ...]
    cost: int
    reason: str


def choose_catch_up(held: int | None, target: int, delta_sizes: dict[int, int], snapshot: int,
                  snapshot_size: int, *, avoid_deltas: bool = False) -> CatchUp | None:
    """The catch-up rule (docs/wire-format.md, "Catch-up rule").

    A device holding version ``held`` (None: nothing usable) fetches the deltas
    ``held+1 .. target`` when they are all retained (``delta_sizes``: version -> blob bytes)
    and their total is smaller than the snapshot path, else the snapshot ``snapshot``
    followed by the deltas ``snapshot+1 .. target``.

    Args:
        avoid_deltas: the direct path failed (a corrupt or missing delta, a hash mismatch):
            take the snapshot path whatever it costs.

    Returns:
        The plan, or None when neither path reaches ``target`` (the snapshot is newer than
        ``target``, or a delta after the snapshot is missing).
    """
    def chain(start: int) -> list[int] | None:
        need = list(range(start + 1, target + 1))
        return need if all(v in delta_sizes for v in need) else None

    snap_path = chain(snapshot) if snapshot <= target else None
    snap_cost = snapshot_size + sum(delta_sizes[v] for v in snap_path) if snap_path is not None else None
    if held is not None and held <= target and not avoid_deltas:
        direct = chain(held)
        if direct is not None:
            cost = sum(delta_sizes[v] for v in direct)
            if snap_cost is None or cost < snap_cost:
                return CatchUp(None, tuple(direct), cost, f"{len(direct)} delta(s) from version {held}")
            reason = f"deltas from version {held} ({cost} bytes) cost more than the snapshot path ({snap_cost} bytes)"
        else:
            reason = f"a delta between version {held} and {target} is not retained"
    elif held is None:
        reason = "no usable version held"
    elif avoid_deltas:
        reason = "the delta path failed"
    else:
        reason = f"held version {held} is newer than {target}"
    if snap_path is None:
        return None
    assert snap_cost is not None
    return CatchUp(snapshot, tuple(snap_path), snap_cost, f"snapshot {snapshot}: {reason}")
