"""The coordinator's side of DP-FedAvg: a noisy sum of clipped client updates over a fixed denominator.

McMahan et al. 2018 ("Learning Differentially Private Recurrent Language Models", Algorithm 1
with the fixed-denominator estimator): every accepted client update has L2 norm <= C (the
update checks reject longer ones), the coordinator adds Gaussian noise N(0, sigma^2 C^2) to
each coordinate of their **sum** and divides by the expected number of participants ``m``, so
one device moves the mean by at most C / m whatever the others sent.

Weights are **uniform**: the sample count a device claims is not used. A sample-weighted mean
``sum n_i u_i / sum n_i`` lets one device with a large (claimed) ``n_i`` move the mean by up to
C, not C / m, and its denominator depends on the data; capping weights would bound it only by
the cap over the sum of the others. Uniform weights keep the sensitivity C without trusting
any claim.
"""

from __future__ import annotations

import math

import numpy as np

from fedmq.fl.aggregation import _AddsInto


class NoisySum:
    """Streaming sum of clipped updates; :meth:`result` adds the noise and divides by ``denominator``.

    Args:
        size: number of model parameters ``d``.
        noise_std: standard deviation of the noise added to each coordinate of the sum
            (``sigma * C``; 0 under distributed noise, where the devices add it).
        denominator: the fixed denominator ``m`` > 0 (expected participants).
        rng: source of the noise (the coordinator's: from operating-system entropy unless a
            test fixes ``[privacy] noise_seed``).

    Attributes:
        total: float64 ``(d,)`` running sum of the updates.
        count: number of updates added.
    """

    def __init__(self, size: int, *, noise_std: float, denominator: float, rng: np.random.Generator) -> None:
        if not (noise_std >= 0 and math.isfinite(noise_std)) or not (denominator > 0 and math.isfinite(denominator)):
            raise ValueError(f"noise std must be >= 0 and the denominator > 0, got {noise_std}, {denominator}")
        self.total = np.zeros(size, dtype=np.float64)
        self.count = 0
        self.noise_std = float(noise_std)
        self.denominator = float(denominator)
        self._rng = rng

    def add(self, update: _AddsInto, weight: float) -> None:
        """Add ``update`` with weight 1 (``weight``, the claimed sample count, is checked and ignored).

        Raises:
            ValueError: ``weight`` is not a positive finite number.
        """
        if not (weight > 0 and np.isfinite(weight)):
            raise ValueError(f"update weight must be positive and finite, got {weight}")
        update.add_into(self.total, 1.0)
        self.count += 1

    def result(self) -> np.ndarray:
        """``(sum + N(0, noise_std^2 I)) / denominator``, float32 ``(d,)``; the noise is drawn on
        each call (call it once per round).

        Raises:
            ValueError: nothing was added.
        """
        if self.count == 0:
            raise ValueError("noisy sum of zero updates")
        noisy = self.total + self._rng.normal(0.0, self.noise_std, self.total.shape) if self.noise_std > 0 \
            else self.total
        return (noisy / self.denominator).astype(np.float32)
