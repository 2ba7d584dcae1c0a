"""Clipping of the sent client update, and the device's noise share (distributed noise).

DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models")
bounds each device's contribution by clipping its update to L2 norm ``C``. With a lossy codec
the bound must hold for what the coordinator *decodes*: Top-K drops entries (the norm only
shrinks) but int8 quantization rounds up as well as down, so clipping before encoding is not
enough. :func:`encode_clipped` encodes, decodes, and when the decoded vector is longer than
``C`` encodes a scaled-down copy again, until the decoded vector is within ``C`` (Top-K keeps
the same entries under a positive scaling and absmax int8 codes the same integers, so one
rescale is almost always enough; a zero update is the last resort, whose norm is 0).
"""

from __future__ import annotations

import math

import numpy as np

from fedmq.codecs import CodecSpec, decode, encode
from fedmq.model.params import ParamSpec

#: Rescales tried before a zero update is sent instead.
MAX_RESCALES = 8
#: Relative margin below ``C`` aimed at by a rescale (float32 rounding of scales and values).
_MARGIN = 1e-5


def l2_norm(vector: np.ndarray) -> float:
    """L2 norm of a float32 vector, accumulated in float64 (the coordinator computes it the same way)."""
    return math.sqrt(float(np.square(vector, dtype=np.float64).sum()))


def encode_clipped(vector: np.ndarray, spec: ParamSpec, config: CodecSpec, clip_norm: float,
                   rng: np.random.Generator | None = None) -> tuple[bytes, np.ndarray]:
    """Encode ``vector`` so that the decoded payload has L2 norm <= ``clip_norm``.

    Args:
        vector: float32 ``(spec.size,)``, finite (the update plus the residual).
        spec: the model's ParamSpec.
        config: codec settings.
        clip_norm: ``C`` > 0 (L2 norm).
        rng: stochastic-rounding noise source (see :func:`fedmq.codecs.encode`).

    Returns:
        ``(payload, sent)``: the payload and float32 ``(spec.size,)``, exactly what the
        coordinator decodes from it, with ``l2_norm(sent) <= clip_norm``.

    Raises:
        ValueError: ``clip_norm`` not positive and finite. SpecMismatchError, NonFiniteError:
        from the codec.
    """
    if not (clip_norm > 0 and math.isfinite(clip_norm)):
        raise ValueError(f"clip norm must be positive and finite, got {clip_norm}")
    target = np.asarray(vector, dtype=np.float32)
    for _ in range(MAX_RESCALES):
        payload = encode(target, spec, config, rng)
        sent = decode(config.name, payload, spec)
        norm = l2_norm(sent)
        if norm <= clip_norm:
            return payload, sent
        target = (target * np.float32(clip_norm / norm * (1.0 - _MARGIN))).astype(np.float32)
    payload = encode(np.zeros(spec.size, dtype=np.float32), spec, config, rng)
    return payload, decode(config.name, payload, spec)


def noise_share(size: int, std: float, rng: np.random.Generator) -> np.ndarray:
    """One device's share of distributed Gaussian noise: float32 ``(size,)`` drawn from N(0, std^2).

    ``m`` shares of std ``sigma C / sqrt(m)`` sum to N(0, sigma^2 C^2) per coordinate; fewer
    survivors leave less (the accountant charges the noise actually present). Continuous
    Gaussian shares suit plain aggregation; in the integer ring of secure aggregation a
    discrete mechanism is needed instead (Kairouz et al. 2021; Agarwal et al. 2021)."""
    return rng.normal(0.0, std, size).astype(np.float32)
