"""Error feedback: the residual memory kept on the device.

Each round the device adds its client update to the residual, compresses the sum and keeps
what the compression dropped, quantization error included::

    residual += update; payload = encode(residual); sent = decode(payload); residual -= sent

so that, over any sequence of rounds, everything the coordinator received plus the final
residual equals the sum of the true updates (Stich et al. 2018, "Sparsified SGD with
Memory"; Karimireddy et al. 2019, "Error Feedback Fixes SignSGD"). When the coordinator
reports that a sent update was not aggregated (lost, late, rejected), :meth:`ErrorFeedback.rollback`
puts its content back into the residual, so nothing is lost.
"""

from __future__ import annotations

import io
import os

import numpy as np

from fedmq.storage.atomic import atomic_write_bytes
from fedmq.codecs import CodecSpec, decode, encode
from fedmq.errors import NonFiniteError, SpecMismatchError, StateError
from fedmq.model.params import ParamSpec
from fedmq.privacy.clipping import encode_clipped


class ErrorFeedback:
    """Residual memory for one model architecture.

    Attributes:
        spec: the ParamSpec the residual belongs to.
        residual: float32 ``(spec.size,)``, what was not yet sent (zeros at start).
    """

    def __init__(self, spec: ParamSpec, residual: np.ndarray | None = None) -> None:
        self.spec = spec
        if residual is None:
            self.residual = np.zeros(spec.size, dtype=np.float32)
        else:
            self.residual = self._vector(residual, "residual")

    def _vector(self, x: np.ndarray, what: str) -> np.ndarray:
        arr = np.asarray(x)
        if arr.shape != (self.spec.size,):
            raise SpecMismatchError(f"{what} shape {arr.shape} does not match ParamSpec size ({self.spec.size},)")
        arr = np.array(arr, dtype=np.float32)  # own copy: callers keep theirs
        if not np.isfinite(arr).all():
            raise NonFiniteError(f"{what} contains NaN or Inf")
        return arr

    def compress(self, update: np.ndarray, config: CodecSpec, *, enabled: bool = True,
                 rng: np.random.Generator | None = None, clip_norm: float = 0.0) -> tuple[bytes, np.ndarray]:
        """Compress ``update`` with error feedback.

        Args:
            update: float32 ``(spec.size,)`` client update (e.g. a delta), finite.
            config: codec settings.
            enabled: False compresses ``update`` alone and leaves the residual untouched
                (ablations without error feedback).
            rng: stochastic-rounding noise source (see :func:`fedmq.codecs.encode`).
            clip_norm: > 0: what is sent is clipped so that its decoded L2 norm is at most
                this (:func:`fedmq.privacy.clipping.encode_clipped`); what clipping removes
                stays in the residual like everything else not sent. 0: no clipping.

        Returns:
            ``(payload, sent)``: the codec payload and float32 ``(spec.size,)``, exactly what
            the coordinator will decode from it (keep it for :meth:`rollback`).

        Raises:
            SpecMismatchError: wrong shape. NonFiniteError: NaN/Inf in ``update``. The residual
            is unchanged when anything is raised.
        """
        upd = self._vector(update, "update")
        target = self.residual + upd if enabled else upd
        if clip_norm > 0:
            payload, sent = encode_clipped(target, self.spec, config, clip_norm, rng)
        else:
            payload = encode(target, self.spec, config, rng)
            sent = decode(config.name, payload, self.spec)
        if enabled:
            target -= sent
            self.residual = target
        return payload, sent

    def rollback(self, sent: np.ndarray) -> None:
        """Put the content of an update that was never aggregated back into the residual.

        Args:
            sent: the ``sent`` vector :meth:`compress` returned for that update.

        Raises:
            SpecMismatchError: wrong shape. NonFiniteError: NaN/Inf in ``sent``.
        """
        self.residual += self._vector(sent, "rolled-back update")

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the residual to ``path`` atomically as a ``.npy`` file (float32, never pickled)."""
        buf = io.BytesIO()
        np.save(buf, self.residual, allow_pickle=False)
        atomic_write_bytes(path, buf.getbuffer())

    @classmethod
    def load(cls, path: str | os.PathLike[str], spec: ParamSpec) -> ErrorFeedback:
        """Read a residual written by :meth:`save`.

        Raises:
            StateError: the file is missing, unreadable, not a float32 ``(spec.size,)`` array
                or holds NaN/Inf (the message names the path).
        """
        try:
            with open(path, "rb") as fh:
                arr = np.load(fh, allow_pickle=False)
        except Exception as exc:  # np.load raises many unrelated types on a corrupt file
            raise StateError(f"residual file {os.fspath(path)!r} cannot be read: {exc}") from None
        if not isinstance(arr, np.ndarray) or arr.dtype != np.float32 or arr.shape != (spec.size,):
            raise StateError(f"residual file {os.fspath(path)!r}: expected float32 ({spec.size},), got "
                             f"{getattr(arr, 'dtype', '?')} {getattr(arr, 'shape', '?')}")
        if not np.isfinite(arr).all():
            raise StateError(f"residual file {os.fspath(path)!r} holds NaN or Inf")
        return cls(spec, arr)
