"""Fixed-point encoding of update values into the ring Z_{2^bits}, wide enough that a sum of
the round's inputs never wraps.

A value v (float) is clipped to [-clip, clip] and rounded to the integer q = round(v * scale),
|q| <= qmax = floor(clip * scale). The sum of at most ``max_devices`` such integers lies in
[-max_devices * qmax, max_devices * qmax]; ``bits`` is the smallest width whose 2^bits
residues hold that whole range, so the masked sum, taken mod 2^bits, decodes to the exact
integer sum (SecAgg's requirement, Bonawitz et al. 2017, section 3: b >= log2(n * range)).
Encoded values are uint64 arrays; bits is at most 63. Under differential privacy each input
also carries discrete Gaussian noise, and ``noise`` widens the range by its headroom.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedmq.errors import FedmqError

MAX_BITS = 63


class RingError(FedmqError):
    """The ring cannot hold the sum (more than 63 bits needed) or the parameters are invalid."""


@dataclass(frozen=True)
class RingSpec:
    """The shared fixed-point ring of a secure round.

    Attributes:
        clip: largest |value| encoded (the update's unit; with differential privacy the clip
            norm bounds it); larger values are clipped and the rest stays in the residual.
        scale: fixed-point scale: integers per unit.
        max_devices: most inputs ever summed (the round's selected devices).
        noise: integers one input may carry beyond ``qmax`` (the headroom of a device's
            discrete Gaussian noise, :func:`fedmq.privacy.discrete.noise_headroom`; 0 without
            differential privacy).
    """

    clip: float
    scale: float
    max_devices: int
    noise: int = 0

    def __post_init__(self) -> None:
        valid = self.clip > 0 and self.scale > 0 and self.max_devices >= 1 and self.noise >= 0
        if not valid or not math.isfinite(self.clip * self.scale):
            raise RingError(f"clip > 0, scale > 0, max_devices >= 1 and noise >= 0 expected, got {self}")
        if self.bits > MAX_BITS:
            raise RingError(f"{self.max_devices} inputs of |q| <= {self.qmax} need {self.bits} bits, at most "
                            f"{MAX_BITS}: lower the scale or the clip")

    @property
    def qmax(self) -> int:
        """Largest |integer| one input holds."""
        return int(math.floor(self.clip * self.scale))

    @property
    def bound(self) -> int:
        """Largest |integer| a sum of the round's inputs holds (noise included)."""
        return self.max_devices * (self.qmax + self.noise)

    @property
    def bits(self) -> int:
        """Ring width: the smallest b with 2^b >= 2 * bound + 1."""
        return max(1, (2 * self.bound).bit_length())

    @property
    def mask(self) -> np.uint64:
        return np.uint64((1 << self.bits) - 1)

    def quantize(self, values: np.ndarray) -> np.ndarray:
        """Clipped, rounded integers of float ``values`` (k,): int64 (k,), |q| <= qmax."""
        q = np.rint(np.clip(np.asarray(values, dtype=np.float64), -self.clip, self.clip) * self.scale)
        return np.clip(q, -self.qmax, self.qmax).astype(np.int64)

    def encode(self, q: np.ndarray) -> np.ndarray:
        """Integers (int64, |q| <= qmax + noise) as ring elements: uint64 (k,) in [0, 2^bits)."""
        return q.astype(np.uint64) & self.mask

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        """What the integers stand for: float32 (k,) (what a device takes out of its residual)."""
        return (q.astype(np.float64) / self.scale).astype(np.float32)

    def decode_sum(self, total: np.ndarray) -> np.ndarray:
        """The exact integer sum (int64 (k,)) from a ring sum (uint64 (k,), already mod 2^bits)."""
        s = (total & self.mask).astype(np.int64)
        return np.where(s > self.bound, s - (1 << self.bits), s)
