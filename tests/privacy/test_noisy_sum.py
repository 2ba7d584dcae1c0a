"""The coordinator's noise: its standard deviation, uniform weights and the fixed denominator."""

from __future__ import annotations

import numpy as np
import pytest

from fedmq.codecs import SparseUpdate
from fedmq.privacy.aggregation import NoisySum


def test_noise_has_the_configured_standard_deviation() -> None:
    d, sigma, clip, m = 200_000, 1.3, 0.7, 20.0
    agg = NoisySum(d, noise_std=sigma * clip, denominator=m, rng=np.random.default_rng(12345))
    agg.add(SparseUpdate(None, np.zeros(d, np.float32), d), 1.0)
    noise = agg.result().astype(np.float64) * m
    # The sample std of 200k N(0, s^2) draws is within 1% of s with probability 1 - 5e-6.
    assert noise.std() == pytest.approx(sigma * clip, rel=0.01)
    assert abs(noise.mean()) < 5 * sigma * clip / np.sqrt(d)


def test_weights_are_uniform_and_the_denominator_fixed() -> None:
    agg = NoisySum(3, noise_std=0.0, denominator=4.0, rng=np.random.default_rng(0))
    agg.add(SparseUpdate(None, np.array([1.0, 0.0, 0.0], np.float32), 3), 1000.0)
    agg.add(SparseUpdate(np.array([2], np.int64), np.array([2.0], np.float32), 3), 1.0)
    np.testing.assert_allclose(agg.result(), [0.25, 0.0, 0.5])
    assert agg.count == 2
    with pytest.raises(ValueError):
        agg.add(SparseUpdate(None, np.zeros(3, np.float32), 3), 0.0)
    with pytest.raises(ValueError):
        NoisySum(3, noise_std=0.0, denominator=4.0, rng=np.random.default_rng(0)).result()
