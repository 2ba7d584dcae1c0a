"""Distributed discrete Gaussian noise for secure rounds (Kairouz, Liu and Steinke 2021, "The
Distributed Discrete Gaussian Mechanism for Federated Learning with Secure Aggregation").

A secure round sums integers in a ring, so the noise must be integer too. Each device adds
its own draw of the discrete Gaussian N_Z(0, std^2) to every integer of its input before
masking it; the sum of the survivors' inputs then carries the sum of their noise, and the
coordinator, which only ever sees that sum, adds nothing.

* **Sensitivity.** The device clips the input's values on the common support to L2 norm
  ``C`` (the clip norm) and maps them to integers by ``trunc(scale * v)``: rounding towards
  zero never lengthens a coordinate, so the integer vector has L2 norm at most ``scale * C``
  whatever the support's size (Delta_2). What truncation leaves out stays in the device's
  residual (error feedback), so the bias does not accumulate.
* **Privacy of one round.** Proposition 14 of Kairouz et al. bounds the Rényi divergence of the
  sum of ``n`` devices' discrete Gaussians of variance ``std^2`` (integers) at every order
  alpha by ``alpha / 2 * min(a, b)`` with ``a = (Delta_2 / (sqrt(n) std) + sqrt(d) tau)^2`` and
  ``b = (Delta_2 / (sqrt(n) std))^2 + 2 Delta_1 tau / (sqrt(n) std) + tau^2 d``, where
  ``tau = 10 sum_{k=1}^{n-1} exp(-2 pi^2 std^2 k / (k + 1))`` measures how far that sum is from
  one discrete Gaussian. Both forms are rho-zCDP with ``rho = min(a, b) / 2``, which
  ``dp-accounting``'s ``ZCDpEvent`` composes (:mod:`fedmq.privacy.accountant`). This module
  only evaluates that formula; every epsilon comes from ``dp-accounting``.
* **Sampling.** The draw is OpenDP's exact discrete Gaussian sampler (``opendp``, the ``dp``
  extra; Canonne, Kamath and Steinke 2020): a device that takes part in private secure rounds
  installs it, other devices never import it.

No amplification by sampling is claimed for these rounds (``dp-accounting`` amplifies only
Gaussian events), so the same noise multiplier spends more epsilon than in a plain round.
"""

from __future__ import annotations

import math

import numpy as np

from fedmq.errors import ConfigError

#: Ring headroom for one device's noise, in standard deviations: a discrete Gaussian draw
#: exceeds it with probability below 2 exp(-NOISE_TAIL^2 / 2) < 1e-86 per coordinate, so the
#: ring holds the noisy sum except with a probability far below any delta used.
NOISE_TAIL = 20.0
#: Smallest per-device standard deviation accepted, in integers (below it tau stops being negligible).
MIN_STD = 1.0


def noise_headroom(std: float) -> int:
    """Integers a device's noise adds to its input's bound in the ring: ``ceil(NOISE_TAIL * std)``."""
    return math.ceil(NOISE_TAIL * std)


def l2_sensitivity(clip_norm: float, scale: float) -> float:
    """Largest L2 norm of one device's integer input: ``scale * clip_norm`` (values clipped to
    ``clip_norm``, then truncated towards zero)."""
    return float(scale) * float(clip_norm)


def tau(std: float, devices: int) -> float:
    """``10 sum_{k=1}^{n-1} exp(-2 pi^2 std^2 k / (k + 1))`` (Kairouz et al. 2021, Theorem 1)."""
    return 10.0 * sum(math.exp(-2.0 * math.pi ** 2 * std ** 2 * k / (k + 1)) for k in range(1, devices))


def ddg_rho(l2: float, std: float, devices: int, dim: int) -> float:
    """zCDP parameter rho of one round: the sum of ``devices`` inputs, each carrying discrete
    Gaussian noise of standard deviation ``std`` (integers) on ``dim`` coordinates, for a
    neighbouring input that moves the sum by at most ``l2`` in L2 norm (the L1 bound used is
    ``sqrt(dim) * l2``). Kairouz et al. 2021, Proposition 14 (module docstring).

    Raises:
        ValueError: ``devices`` < 1, ``dim`` < 1, or ``std`` / ``l2`` not positive and finite.
    """
    if devices < 1 or dim < 1 or not (std > 0 and math.isfinite(std)) or not (l2 > 0 and math.isfinite(l2)):
        raise ValueError(f"devices >= 1, dim >= 1, std > 0 and l2 > 0 expected, got {devices}, {dim}, {std}, {l2}")
    t = tau(std, devices)
    scaled = l2 / (math.sqrt(devices) * std)
    l1_scaled = math.sqrt(dim) * scaled
    a = (scaled + math.sqrt(dim) * t) ** 2
    b = scaled ** 2 + 2.0 * l1_scaled * t + t ** 2 * dim
    return 0.5 * min(a, b)


def sampler_available() -> bool:
    """Whether OpenDP's sampler can be imported here (a device without it refuses private secure rounds)."""
    try:
        import opendp.prelude  # noqa: F401
    except ImportError:
        return False
    return True


def discrete_gaussian(std: float, size: int) -> np.ndarray:
    """``size`` independent draws of N_Z(0, std^2): int64 ``(size,)`` (OpenDP's exact sampler,
    with cryptographically secure randomness).

    Raises:
        ConfigError: ``opendp`` is not installed (``pip install 'fedmq[dp]'``), or ``std`` is
            below :data:`MIN_STD`.
    """
    if not std >= MIN_STD or not math.isfinite(std):
        raise ConfigError(f"discrete Gaussian noise needs a standard deviation >= {MIN_STD} integers, got {std}")
    try:
        import opendp.prelude as dp
    except ImportError:
        raise ConfigError("differentially private secure rounds need OpenDP's discrete Gaussian sampler on the "
                          "device: pip install 'fedmq[dp]' (package opendp)") from None
    dp.enable_features("contrib")
    space = dp.vector_domain(dp.atom_domain(T=int)), dp.l2_distance(T=int)
    measurement = space >> dp.m.then_gaussian(scale=float(std))
    return np.asarray(measurement([0] * int(size)), dtype=np.int64)
