"""The FedBuff engine: staleness weights as specified, stale updates rejected, resends answered."""

import numpy as np
import pytest

from fedmq.codecs import CodecSpec, decode, encode
from fedmq.wire.envelope import ClientUpdate, encode_update
from fedmq.errors import ConfigError
from fedmq.fl.buffered import BufferedEngine, StalenessPolicy
from fedmq.fl.rounds import Accepted, Rejected, Repeat, UpdateChecks
from fedmq.model.params import ParamSpec

SPEC = ParamSpec(("w", "b"), ((30, 40), (40,)), ("float32", "float32"))
CFG = CodecSpec.of(name="topk-int8", density=0.1)


def payload(seed):
    return encode(np.random.default_rng(seed).normal(size=SPEC.size).astype(np.float32), SPEC, CFG)


def make(device, round_, base, samples=10, seed=0):
    return encode_update(ClientUpdate(federation="f", device=device, round=round_, base_version=base,
                                      samples=samples, kind="delta", spec_hash=SPEC.hash, codec="topk-int8",
                                      payload=payload(seed), metrics={"train_loss": 0.5}))


def engine(k=3, exponent=0.5, max_staleness=4, version=5):
    return BufferedEngine("f", SPEC, kind="delta", is_known=lambda d: True, max_update_bytes=1 << 20, buffer_size=k,
                          staleness=StalenessPolicy(exponent, max_staleness), step=version, version=version)


def test_weight_is_polynomial_in_staleness():
    pol = StalenessPolicy(exponent=0.5, max_staleness=10)
    assert [pol.weight(s) for s in (0, 3, 8)] == pytest.approx([1.0, 0.5, 1 / 3])
    assert StalenessPolicy(exponent=2.0).weight(1) == pytest.approx(0.25)
    assert StalenessPolicy(exponent=0.0).weight(7) == 1.0
    with pytest.raises(ConfigError):
        StalenessPolicy(exponent=-1.0)
    with pytest.raises(ConfigError):
        StalenessPolicy(max_staleness=-1)


def test_buffer_steps_with_staleness_discounted_sample_weighted_mean():
    eng = engine(k=3, exponent=1.0, max_staleness=4, version=5)
    # staleness 0, 1 and 3 -> weights 1, 1/2, 1/4; samples 10, 20, 40
    offers = [("a", 6, 5, 10, 1), ("b", 4, 4, 20, 2), ("c", 3, 2, 40, 3)]
    for device, round_, base, samples, seed in offers:
        assert isinstance(eng.offer(device, "t" + device, make(device, round_, base, samples, seed)), Accepted)
    assert eng.ready
    assert [b.staleness for b in eng.buffer] == [0, 1, 3]
    closed = eng.flush(100.0)
    vecs = [decode("topk-int8", payload(seed), SPEC).astype(np.float64) for *_, seed in offers]
    expected = (10 * 1.0 * vecs[0] + 20 * 0.5 * vecs[1] + 40 * 0.25 * vecs[2]) / 70
    np.testing.assert_allclose(closed.model_delta, expected, rtol=1e-5, atol=1e-6)
    rec = closed.record
    assert (rec.round, rec.base_version, rec.model_version, rec.accepted, rec.target) == (6, 5, 6, 3, 3)
    assert rec.device_metrics["staleness"] == pytest.approx((10 * 0 + 20 * 1 + 40 * 3) / 70)
    assert eng.version == 6 and not eng.buffer and not eng.ready
    # the receipt of a resend after a restart must name the task's round, which the record keeps
    assert sorted(p.metrics["task_round"] for p in rec.participations) == [3.0, 4.0, 6.0]


def test_update_staler_than_the_maximum_is_rejected_as_stale_not_at_the_maximum():
    eng = engine(max_staleness=2, version=5)
    at_max = eng.offer("a", "t1", make("a", 4, 3))
    assert isinstance(at_max, Accepted)
    out = eng.offer("b", "t2", make("b", 3, 2))
    assert isinstance(out, Rejected) and out.reason == "stale" and out.round == 3
    assert eng.rejected == {"stale": 1} and len(eng.buffer) == 1
    # its resend gets the same answer, not a second judgement
    again = eng.offer("b", "t2", make("b", 3, 2))
    assert isinstance(again, Repeat) and (again.status, again.reason, again.round) == ("rejected", "stale", 3)


def test_resend_after_the_flush_is_answered_accepted_and_not_counted_twice():
    eng = engine(k=1, version=0)
    assert isinstance(eng.offer("a", "t1", make("a", 1, 0)), Accepted)
    eng.flush(1.0)
    again = eng.offer("a", "t1", make("a", 1, 0))
    assert isinstance(again, Repeat) and again.status == "accepted" and again.round == 1
    assert not eng.buffer


def test_second_update_for_the_same_task_round_is_a_duplicate_a_later_round_is_not():
    eng = engine(k=5, version=3)
    assert isinstance(eng.offer("a", "t1", make("a", 4, 3)), Accepted)
    dup = eng.offer("a", "t2", make("a", 4, 3, seed=9))
    assert isinstance(dup, Rejected) and dup.reason == "duplicate"
    assert isinstance(eng.offer("a", "t3", make("a", 5, 3, seed=8)), Accepted)


def test_model_version_from_the_future_and_unknown_device():
    eng = engine(version=2)
    out = eng.offer("a", "t", make("a", 4, 3))
    assert isinstance(out, Rejected) and out.reason == "wrong_base_version"
    eng.is_known = lambda d: False
    out = eng.offer("b", "t", make("b", 3, 2))
    assert isinstance(out, Rejected) and out.reason == "unknown_device"


def test_remembered_answers_survive_a_restart():
    eng = engine(version=4)
    eng.remember("a", "t1", "accepted", "", 4)
    again = eng.offer("a", "t1", make("a", 4, 3))
    assert isinstance(again, Repeat) and again.status == "accepted"
    dup = eng.offer("a", "t9", make("a", 4, 3))
    assert isinstance(dup, Rejected) and dup.reason == "duplicate"


def test_flush_of_an_empty_buffer_raises():
    with pytest.raises(ValueError):
        engine().flush(0.0)


def test_claim_and_content_checks_are_the_synchronous_ones():
    # The same UpdateChecks object type as RoundEngine: the sample cap, the device's own
    # announced count, and the data-set norm bound (median of recent accepted norms).
    checks = UpdateChecks(max_samples=100, samples_of=lambda d: 50 if d == "b" else 0, norm_factor=3.0,
                          norm_warmup=2, norm_initial=1e9)
    eng = BufferedEngine("f", SPEC, kind="delta", is_known=lambda d: True, max_update_bytes=1 << 20, buffer_size=10,
                         checks=checks, step=2, version=2)
    out = eng.offer("a", "t1", make("a", 3, 2, samples=101))
    assert isinstance(out, Rejected) and out.reason == "over_weighted" and out.round == 3
    out = eng.offer("b", "t2", make("b", 3, 2, samples=51))
    assert isinstance(out, Rejected) and out.reason == "over_weighted"
    first = eng.offer("c", "t3", make("c", 3, 2, seed=1))
    second = eng.offer("d", "t4", make("d", 3, 2, seed=2))
    assert isinstance(first, Accepted) and isinstance(second, Accepted)
    assert list(checks.norms) == [first.norm, second.norm]
    assert checks.current_norm_bound() == pytest.approx(3.0 * np.median([first.norm, second.norm]))
    big = encode_update(ClientUpdate(federation="f", device="e", round=3, base_version=2, samples=10, kind="delta",
                                     spec_hash=SPEC.hash, codec="topk-int8", metrics={},
                                     payload=encode(np.full(SPEC.size, 50.0, np.float32), SPEC, CFG)))
    out = eng.offer("e", "t5", big)
    assert isinstance(out, Rejected) and out.reason == "norm_bound"
    assert eng.rejected == {"over_weighted": 2, "norm_bound": 1} and len(eng.buffer) == 2


def test_after_the_last_step_an_update_is_refused_for_its_own_task_round():
    # The device matches a receipt by round and transfer: one naming the step after the
    # last would be ignored and the update resent forever.
    eng = engine(k=1, version=0)
    eng.max_steps = 1
    assert isinstance(eng.offer("a", "t1", make("a", 1, 0)), Accepted)
    eng.flush(1.0)
    late = eng.offer("b", "t2", make("b", 1, 0))
    assert isinstance(late, Rejected) and (late.reason, late.round) == ("finished", 1)
    again = eng.offer("b", "t2", make("b", 1, 0))
    assert isinstance(again, Repeat) and (again.status, again.reason, again.round) == ("rejected", "finished", 1)


def test_a_transfer_refused_unread_names_the_round_of_the_task_its_device_holds():
    eng = engine(k=2, version=4)
    eng.task_round_of = {"a": 3}.get
    assert eng.admit("a", "t1", 1 << 30).round == 3          # oversized, from the manifest
    assert eng.refuse("a", "t2", "malformed", "bad manifest").round == 3
    out = eng.offer("a", "t3", b"\x00garbage")
    assert isinstance(out, Rejected) and (out.reason, out.round) == ("malformed", 3)
    # no task known: the step in progress
    assert eng.refuse("z", "t4", "malformed", "bad manifest").round == 5
