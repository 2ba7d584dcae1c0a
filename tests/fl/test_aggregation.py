"""Streaming aggregation equals the plain weighted mean; sampling is seeded and uniform."""

import numpy as np
import pytest

from fedmq.fl.aggregation import WeightedMean, model_delta
from fedmq.fl.sampling import SelectionPolicy, round_rng, select_devices
from fedmq.codecs import CodecSpec, decode, decode_sparse, encode
from fedmq.model.params import ParamSpec

SPEC = ParamSpec(("w", "b"), ((40, 50), (50,)), ("float32", "float32"))


@pytest.mark.parametrize("codec", ["topk-int8", "none"])
def test_streamed_mean_equals_plain_weighted_mean(codec):
    rng = np.random.default_rng(3)
    cfg = CodecSpec.from_table(codec, {"density": 0.05})
    payloads = [encode(rng.normal(size=SPEC.size).astype(np.float32), SPEC, cfg) for _ in range(12)]
    weights = rng.integers(1, 500, size=12)
    acc = WeightedMean(SPEC.size)
    for p, w in zip(payloads, weights):
        acc.add(decode_sparse(codec, p, SPEC), float(w))
    dense = np.stack([decode(codec, p, SPEC).astype(np.float64) for p in payloads])
    want = (dense * weights[:, None]).sum(axis=0) / weights.sum()
    np.testing.assert_allclose(acc.result(), want.astype(np.float32), rtol=1e-6, atol=1e-7)
    assert acc.count == 12 and acc.weight == weights.sum()


def test_accumulator_stays_one_model_sized_array():
    acc = WeightedMean(SPEC.size)
    assert acc.total.nbytes == 8 * SPEC.size


def test_mean_of_nothing_and_bad_weight_raise():
    acc = WeightedMean(SPEC.size)
    with pytest.raises(ValueError):
        acc.result()
    upd = decode_sparse("none", encode(np.ones(SPEC.size, np.float32), SPEC, CodecSpec.of(name="none")), SPEC)
    with pytest.raises(ValueError):
        acc.add(upd, 0.0)


def test_gradient_updates_step_against_the_mean():
    g = np.array([1.0, -2.0], np.float32)
    assert model_delta(g, "gradient").tolist() == [-1.0, 2.0]
    assert model_delta(g, "delta") is g
    with pytest.raises(ValueError):
        model_delta(g, "other")


def test_selection_over_selects_and_is_a_function_of_seed_and_round():
    devices = [f"d{i}" for i in range(30)]
    part = SelectionPolicy(10, min_updates=5, over_selection=1.3)
    a = select_devices(devices, part, seed=7, round_=3)
    assert len(a) == 13 and len(set(a)) == 13 and set(a) <= set(devices)
    assert select_devices(reversed(devices), part, seed=7, round_=3) == a
    assert select_devices(devices, part, seed=7, round_=4) != a


def test_selection_is_capped_by_eligible_devices_and_fraction_rounds_up():
    assert len(select_devices(["a", "b"], SelectionPolicy(10), 0, 1)) == 2
    assert select_devices([], SelectionPolicy(10), 0, 1) == []
    frac = SelectionPolicy(0.25, over_selection=1.0)
    assert frac.target(10) == 3 and frac.selection_size(10) == 3


def test_selection_is_uniform():
    devices = [f"d{i}" for i in range(10)]
    part = SelectionPolicy(2, over_selection=1.0)
    counts = dict.fromkeys(devices, 0)
    for r in range(2000):
        for d in select_devices(devices, part, seed=1, round_=r):
            counts[d] += 1
    # 4000 picks over 10 devices: 400 each, binomial sd ~19.
    assert all(300 < c < 500 for c in counts.values()), counts


def test_round_rng_is_pure():
    assert round_rng(5, 2).integers(1 << 30) == round_rng(5, 2).integers(1 << 30)
