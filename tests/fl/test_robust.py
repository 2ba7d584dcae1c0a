"""Robust aggregation rules (fedmq.fl.robust): hand-computed results on small dense and
sparse inputs, the honest-range property of the median and the trimmed mean, Krum picking
an honest update, memory bounded by the kept entries."""

import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmq.codecs import SparseUpdate
from fedmq.errors import ConfigError
from fedmq.fl.aggregation import aggregator_names, make_aggregator
from fedmq.fl.robust import CenteredClipping, CoordinateMedian, Krum, MultiKrum, TrimmedMean, _squared_distances

DENSE = [[1, 0, -2, 5], [2, 1, -1, -5], [3, 10, 0, 0], [100, 2, -3, 1], [-50, 4, 7, 2]]
# (indices, values) over 6 coordinates; coordinates 3 and 4 are sent by nobody.
SPARSE = [([0, 2], [1, -4]), ([0, 1], [3, 2]), ([0, 2, 5], [-1, 6, 1]), ([0, 1], [10, -3]), ([2], [5])]


def dense(rows):
    return [SparseUpdate(None, np.asarray(r, np.float32), len(r)) for r in rows]


def sparse(items, size=6):
    return [SparseUpdate(np.asarray(i, np.int64), np.asarray(v, np.float32), size) for i, v in items]


def combine(agg, updates, weights=None):
    for u, w in zip(updates, weights or [1.0] * len(updates)):
        agg.add(u, w)
    return agg.result()


def test_every_rule_is_registered():
    assert {"weighted-mean", "median", "trimmed-mean", "krum", "multi-krum", "centered-clipping"} <= set(
        aggregator_names())


def test_median_and_trimmed_mean_dense_by_hand():
    np.testing.assert_allclose(combine(CoordinateMedian(4), dense(DENSE)), [2, 2, -1, 1])
    np.testing.assert_allclose(combine(TrimmedMean(4, trim=0.2), dense(DENSE)), [2, 7 / 3, -1, 1], rtol=1e-6)
    # trim 0 is the plain mean; an even count takes the mean of the two middle values
    np.testing.assert_allclose(combine(TrimmedMean(4, trim=0.0), dense(DENSE)), np.mean(DENSE, axis=0), rtol=1e-6)
    np.testing.assert_allclose(combine(CoordinateMedian(4), dense(DENSE[:4])), [2.5, 1.5, -1.5, 0.5])


def test_median_and_trimmed_mean_sparse_by_hand_both_readings_of_unsent():
    # abstain: each coordinate over the updates that sent it
    np.testing.assert_allclose(combine(CoordinateMedian(6, unsent="abstain"), sparse(SPARSE)),
                               [2, -0.5, 5, 0, 0, 1])
    np.testing.assert_allclose(combine(TrimmedMean(6, trim=0.25, unsent="abstain"), sparse(SPARSE)),
                               [2, -0.5, 7 / 3, 0, 0, 1], rtol=1e-6)
    # zero: an unsent coordinate is a sent zero (5 values everywhere)
    np.testing.assert_allclose(combine(CoordinateMedian(6, unsent="zero"), sparse(SPARSE)), [1, 0, 0, 0, 0, 0])
    np.testing.assert_allclose(combine(TrimmedMean(6, trim=0.2, unsent="zero"), sparse(SPARSE)),
                               [4 / 3, 0, 5 / 3, 0, 0, 0], rtol=1e-6)


def test_zero_reading_equals_the_dense_reading():
    rng = np.random.default_rng(0)
    size, ups = 50, []
    for _ in range(9):
        idx = np.sort(rng.choice(size, 7, replace=False))
        ups.append(SparseUpdate(idx.astype(np.int64), rng.normal(size=7).astype(np.float32), size))
    dense_rows = np.stack([u.to_dense() for u in ups])
    np.testing.assert_allclose(combine(CoordinateMedian(size, unsent="zero"), ups), np.median(dense_rows, axis=0))
    cut = np.sort(dense_rows, axis=0)[2:-2]
    np.testing.assert_allclose(combine(TrimmedMean(size, trim=0.25, unsent="zero"), ups), cut.mean(axis=0),
                               rtol=1e-5, atol=1e-7)


KRUM_POINTS = [[0, 0], [1, 0], [0, 1], [0.5, 0.5], [10, 10]]


def test_krum_and_multi_krum_by_hand():
    # f = 1 of 5, scores over the 2 nearest: (0.5, 0.5) scores 1.0, the other honest 1.5, (10, 10) far more
    krum = Krum(2, byzantine=0.2)
    np.testing.assert_allclose(combine(krum, dense(KRUM_POINTS)), [0.5, 0.5])
    np.testing.assert_allclose(krum.scores()[:4], [1.5, 1.5, 1.5, 1.0])
    assert krum.chosen == [3]
    # Multi-Krum keeps n - f = 4 and weights them by samples; the outlier's 100 samples buy it nothing
    mk = MultiKrum(2, byzantine=0.2)
    np.testing.assert_allclose(combine(mk, dense(KRUM_POINTS), [1, 1, 1, 1, 100]), [0.375, 0.375])
    assert sorted(mk.chosen) == [0, 1, 2, 3]
    # select = n is the weighted mean
    every = combine(MultiKrum(2, byzantine=0.2, select=5), dense(KRUM_POINTS), [1, 2, 3, 4, 5])
    np.testing.assert_allclose(every, np.average(KRUM_POINTS, axis=0, weights=[1, 2, 3, 4, 5]), rtol=1e-6)


def test_krum_sparse_distances_read_unsent_as_zero():
    ups = sparse([([0], [1.0]), ([1], [1.0]), ([0, 1], [1.0, 1.0]), ([2, 5], [3.0, -1.0])])
    rows = np.stack([u.to_dense() for u in ups]).astype(np.float64)
    want = ((rows[:, None, :] - rows[None, :, :]) ** 2).sum(axis=2)
    np.testing.assert_allclose(_squared_distances(ups, 6), want)
    mixed = ups[:2] + dense([[0, 0, 3, 0, 0, -1]])
    np.testing.assert_allclose(_squared_distances(mixed, 6)[0], [0, 2, 11])


def test_krum_picks_an_honest_update_among_sparse_attackers():
    rng = np.random.default_rng(7)
    size, honest_mean = 400, rng.normal(size=400).astype(np.float32)
    ups = []
    for _ in range(14):
        x = honest_mean + 0.1 * rng.normal(size=size).astype(np.float32)
        idx = np.sort(np.argsort(-np.abs(x))[:40]).astype(np.int64)  # Top-K, each its own support
        ups.append(SparseUpdate(idx, x[idx], size))
    for _ in range(4):  # Byzantine: the honest direction flipped and scaled
        idx = np.sort(rng.choice(size, 40, replace=False)).astype(np.int64)
        ups.append(SparseUpdate(idx, -5 * honest_mean[idx], size))
    order = rng.permutation(len(ups))
    krum = Krum(size, byzantine=0.25)
    combine(krum, [ups[i] for i in order])
    assert order[krum.chosen[0]] < 14
    mk = MultiKrum(size, byzantine=0.25)
    combine(mk, [ups[i] for i in order])
    assert all(order[i] < 14 for i in mk.chosen)


def reference_centered_clipping(rows, tau, iterations):
    x, v = np.asarray(rows, np.float64), np.zeros(len(rows[0]))
    for _ in range(iterations):
        d = x - v
        dist = np.linalg.norm(d, axis=1)
        t = tau or np.median(dist)
        v = v + np.mean(d * np.minimum(1.0, t / np.maximum(dist, 1e-300))[:, None], axis=0)
    return v


def test_centered_clipping_by_hand_and_against_a_dense_reference():
    rows = [[1, 0], [0, 1], [10, 0]]
    # one iteration from 0 with tau 1: (1,0) + (0,1) + (1,0) over 3
    np.testing.assert_allclose(combine(CenteredClipping(2, clip_radius=1.0, clip_iterations=1), dense(rows)),
                               [2 / 3, 1 / 3], rtol=1e-6)
    np.testing.assert_allclose(combine(CenteredClipping(2, clip_radius=1.0, clip_iterations=2), dense(rows)),
                               reference_centered_clipping(rows, 1.0, 2), rtol=1e-6)
    ups = sparse(SPARSE)
    rows6 = [u.to_dense() for u in ups]
    for tau in (0.0, 2.0):
        np.testing.assert_allclose(combine(CenteredClipping(6, clip_radius=tau, clip_iterations=3), ups),
                                   reference_centered_clipping(rows6, tau, 3), rtol=1e-5, atol=1e-7)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_median_and_trimmed_mean_stay_in_the_honest_range(data):
    n = data.draw(st.integers(3, 15))
    trim = data.draw(st.sampled_from([0.1, 0.2, 0.3, 0.45]))
    rule = data.draw(st.sampled_from(["median", "trimmed-mean"]))
    tolerated = (n - 1) // 2 if rule == "median" else int(np.floor(trim * n + 1e-9))
    bad = data.draw(st.integers(0, tolerated))
    size = 5
    honest_vals = st.floats(-10, 10, allow_nan=False, width=32)
    honest = np.array(data.draw(st.lists(st.lists(honest_vals, min_size=size, max_size=size),
                                         min_size=n - bad, max_size=n - bad)), np.float32)
    arbitrary = np.array(data.draw(st.lists(st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=size,
                                                     max_size=size), min_size=bad, max_size=bad)),
                         np.float32).reshape(bad, size)
    rows = np.concatenate([honest, arbitrary])[data.draw(st.permutations(list(range(n))))]
    agg = make_aggregator(rule, size, {"trim": trim})
    out = combine(agg, dense(rows)).astype(np.float64)
    slack = 1e-5 * (1 + np.abs(honest).max())
    assert np.all(out >= honest.min(axis=0) - slack) and np.all(out <= honest.max(axis=0) + slack)


def test_memory_is_bounded_by_kept_entries_not_by_updates_times_model_size():
    size, n, nnz = 2_000_000, 20, 2_000
    rng = np.random.default_rng(1)
    ups = [SparseUpdate(np.sort(rng.choice(size, nnz, replace=False)).astype(np.int64),
                        rng.normal(size=nnz).astype(np.float32), size) for _ in range(n)]
    for rule in ("median", "trimmed-mean", "krum", "multi-krum", "centered-clipping"):
        agg = make_aggregator(rule, size)
        tracemalloc.start()
        combine(agg, ups)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        # n dense float32 copies would be 160 MB; a few model-sized vectors are 8-16 MB each
        assert peak < 5 * 8 * size, (rule, peak)


def test_options_reach_the_rule_and_bad_ones_are_refused():
    agg = make_aggregator("trimmed-mean", 4, {"trim": 0.3, "byzantine": 0.1, "unsent": "zero"})
    assert agg.trim == 0.3 and agg.unsent == "zero"
    assert make_aggregator("weighted-mean", 4, {"trim": 0.3}).count == 0
    with pytest.raises(ConfigError):
        make_aggregator("trimmed-mean", 4, {"trim": 0.5})
    with pytest.raises(ConfigError):
        make_aggregator("median", 4, {"unsent": "skip"})
    with pytest.raises(ConfigError):
        make_aggregator("krum", 4, {"byzantine": 0.5})
    with pytest.raises(ValueError):
        CoordinateMedian(4).result()
    with pytest.raises(ValueError):
        CoordinateMedian(4).add(dense([[1, 2, 3, 4]])[0], float("nan"))



def test_the_round_engine_runs_a_robust_rule_with_its_options_round_after_round():
    from fedmq.codecs import CodecSpec, encode
    from fedmq.wire.envelope import ClientUpdate, encode_update
    from fedmq.fl.rounds import Accepted, RoundEngine
    from fedmq.model.params import ParamSpec

    spec = ParamSpec(("w",), ((6,),), ("float32",))
    cfg = CodecSpec.of(name="none")

    def update(device, round_, values):
        return encode_update(ClientUpdate(federation="f", device=device, round=round_, base_version=round_ - 1,
                                          samples=10, kind="delta", spec_hash=spec.hash, codec="none",
                                          payload=encode(np.asarray(values, np.float32), spec, cfg), metrics={}))

    with pytest.raises(ConfigError):
        RoundEngine("f", spec, kind="delta", is_known=lambda d: True, max_update_bytes=1 << 16,
                    aggregator="trimmed-mean", aggregator_options={"trim": 0.7})
    engine = RoundEngine("f", spec, kind="delta", is_known=lambda d: True, max_update_bytes=1 << 16,
                         aggregator="trimmed-mean", aggregator_options={"trim": 0.25, "byzantine": 0.1})
    devices = ["a", "b", "c", "d"]
    for round_ in (1, 2):
        engine.open(round_, round_ - 1, devices, 4, deadline=100.0, started=0.0)
        rows = [[1] * 6, [2] * 6, [3] * 6, [1000] * 6]
        for d, row in zip(devices, rows):
            assert isinstance(engine.offer(d, f"t{d}{round_}", update(d, round_, row)), Accepted)
        closed = engine.close(10.0)
        # 4 values, one cut at each end: the mean of 2 and 3, not the 1000
        np.testing.assert_allclose(closed.model_delta, [2.5] * 6)
        assert isinstance(engine.aggregate, TrimmedMean) and engine.aggregate.trim == 0.25


def test_the_buffered_engine_builds_each_buffer_with_the_rule_and_its_options():
    from fedmq.fl.buffered import BufferedEngine
    from fedmq.model.params import ParamSpec

    spec = ParamSpec(("w",), ((6,),), ("float32",))
    engine = BufferedEngine("f", spec, kind="delta", is_known=lambda d: True, max_update_bytes=1 << 16,
                            buffer_size=3, aggregator="median", aggregator_options={"unsent": "zero", "trim": 0.1})
    assert isinstance(engine.aggregate, CoordinateMedian) and engine.aggregate.unsent == "zero"
