"""The round engine: every rejection reason triggered, the round's record and aggregate."""

import msgpack
import numpy as np

from fedmq.fl.rounds import REASONS, Accepted, Rejected, Repeat, RoundEngine
from fedmq.codecs import CodecConfig, encode
from fedmq.envelope import ClientUpdate, encode_update
from fedmq.params import ParamSpec

SPEC = ParamSpec(("w", "b"), ((30, 40), (40,)), ("float32", "float32"))
OTHER = ParamSpec(("w",), ((7,),), ("float32",))
CFG = CodecConfig(name="topk-int8", density=0.1)


def make(device="a", round_=4, base=2, samples=10, kind="delta", fed="f", spec=SPEC, payload=None, scale=1.0):
    if payload is None:
        payload = encode(np.random.default_rng(0).normal(size=spec.size).astype(np.float32) * scale, spec, CFG)
    return encode_update(ClientUpdate(federation=fed, device=device, round=round_, base_version=base,
                                      samples=samples, kind=kind, spec_hash=spec.hash, codec="topk-int8",
                                      payload=payload, metrics={"train_loss": 0.5}))


class _Gate:
    """An engine with round 4 (base version 2) open for a and b; ``check`` is ``offer``."""

    def __init__(self, selected=("a", "b"), target=10, **kw):
        args = dict(kind="delta", is_known=lambda d: d in {"a", "b", "c"}, max_update_bytes=1 << 20,
                    norm_bound=None)
        args.update(kw)
        self.engine = RoundEngine("f", SPEC, round=3, base_version=2, **args)
        self.engine.open(4, 2, list(selected), target, deadline=100.0, started=0.0)

    def check(self, device, transfer, data):
        return self.engine.offer(device, transfer, data)

    def close(self):
        return self.engine.close(10.0)

    def next_round(self, round_, base, selected):
        self.engine.open(round_, base, list(selected), 10, deadline=200.0, started=100.0)


def gate(**kw):
    return _Gate(**kw)


def reason(result):
    assert isinstance(result, Rejected), result
    return result.reason


def test_valid_update_is_accepted():
    res = gate().check("a", "t1", make())
    assert isinstance(res, Accepted)
    assert res.update.samples == 10 and res.norm > 0


def test_oversized():
    assert reason(gate(max_update_bytes=100).check("a", "t", make())) == "oversized"


def test_spec_mismatch():
    upd = make(spec=OTHER, payload=encode(np.ones(7, np.float32), OTHER, CFG))
    assert reason(gate().check("a", "t", upd)) == "spec_mismatch"


def test_malformed_envelope_and_payload():
    assert reason(gate().check("a", "t", b"\x00garbage")) == "malformed"
    assert reason(gate().check("a", "t2", make(payload=b"\x01" * 40))) == "malformed"
    assert reason(gate().check("b", "t", make(device="b", kind="gradient"))) == "malformed"
    assert reason(gate().check("a", "t", make(fed="g"))) == "malformed"


def test_zero_samples_is_malformed():
    assert reason(gate().check("a", "t", make(samples=0))) == "malformed"


def test_device_must_publish_as_itself():
    assert reason(gate().check("b", "t", make(device="a"))) == "device_mismatch"


def test_unknown_and_unselected_devices():
    assert reason(gate().check("z", "t", make(device="z"))) == "unknown_device"
    assert reason(gate().check("c", "t", make(device="c"))) == "unselected"


def test_wrong_round_and_base_version():
    assert reason(gate().check("a", "t", make(round_=9))) == "wrong_round"
    assert reason(gate().check("a", "t", make(base=1))) == "wrong_base_version"


def test_duplicate_and_resend_of_the_same_transfer():
    g = gate()
    assert isinstance(g.check("a", "t1", make()), Accepted)
    assert g.check("a", "t1", make()) == Repeat("accepted", "", 4)
    assert reason(g.check("a", "t2", make())) == "duplicate"


def test_resend_after_the_round_closed_gets_the_same_answer_not_late():
    # A device killed before it saw its receipt resends the same transfer later: it must
    # hear "accepted" again (or it would roll back an update that is in the aggregate),
    # while a new transfer for the closed round is late.
    g = gate()
    assert isinstance(g.check("a", "t1", make()), Accepted)
    g.close()
    assert g.check("a", "t1", make()) == Repeat("accepted", "", 4)
    assert reason(g.check("b", "t9", make(device="b"))) == "late"
    g.next_round(g.engine.round + 1, g.engine.base_version + 1, ["a", "b"])
    assert g.check("a", "t1", make()) == Repeat("accepted", "", 4)
    assert reason(g.check("a", "t2", make())) == "late"


def test_non_finite_payload():
    # A scale of the int8 payload patched to NaN: find the float32 scales by re-encoding.
    payload = bytearray(encode(np.ones(SPEC.size, np.float32), SPEC, CodecConfig(name="none")))
    payload[0:4] = np.array([np.nan], np.float32).tobytes()
    body = msgpack.unpackb(make(), raw=False)
    body["codec"] = "none"
    body["payload"] = bytes(payload)
    assert reason(gate().check("a", "t", msgpack.packb(body, use_bin_type=True))) == "non_finite"


def test_norm_bound():
    assert reason(gate(norm_bound=1e-3).check("a", "t", make())) == "norm_bound"
    assert isinstance(gate(norm_bound=1e6).check("a", "t", make()), Accepted)


def test_late_after_close_and_in_the_next_round():
    g = gate()
    g.close()
    assert reason(g.check("b", "t", make(device="b"))) == "late"
    g.next_round(5, 3, {"c"})
    assert reason(g.check("b", "t", make(device="b"))) == "late"
    # Round 4 did not select c: its round-4 update is simply for the wrong round.
    assert reason(g.check("c", "t", make(device="c"))) == "wrong_round"


def test_every_reason_has_a_test():
    import inspect
    import sys
    src = inspect.getsource(sys.modules[__name__])
    assert all(f'== "{r}"' in src for r in REASONS)


def test_target_reached_completes_the_round_and_later_answers_are_late():
    g = gate(target=1)
    assert isinstance(g.check("a", "t1", make()), Accepted)
    assert g.engine.complete
    assert reason(g.check("b", "t2", make(device="b"))) == "late"


def test_every_selected_device_answering_completes_the_round():
    g = gate()
    assert isinstance(g.check("a", "t1", make()), Accepted)
    assert not g.engine.complete
    assert reason(g.check("b", "t2", make(device="b", base=1))) == "wrong_base_version"
    assert g.engine.complete


def test_close_gives_the_record_and_the_weighted_mean():
    from fedmq.codecs import decode
    g = gate(min_updates=2)
    ua = make(device="a", samples=10, payload=encode(np.full(SPEC.size, 1.0, np.float32), SPEC, CFG))
    ub = make(device="b", samples=30, payload=encode(np.full(SPEC.size, 2.0, np.float32), SPEC, CFG))
    g.engine.count_bytes("a", "ta", len(ua))
    assert isinstance(g.check("a", "ta", ua), Accepted)
    assert isinstance(g.check("b", "tb", ub), Accepted)
    closed = g.close()
    rec = closed.record
    assert closed.succeeded and rec.state == "closed" and rec.model_version == 3 and rec.accepted == 2
    da = decode("topk-int8", encode(np.full(SPEC.size, 1.0, np.float32), SPEC, CFG), SPEC)
    db = decode("topk-int8", encode(np.full(SPEC.size, 2.0, np.float32), SPEC, CFG), SPEC)
    np.testing.assert_allclose(closed.model_delta, (10 * da + 30 * db) / 40, rtol=1e-6)
    parts = {p.device: p for p in rec.participations}
    assert parts["a"].status == "accepted" and parts["a"].bytes_up == len(ua) and parts["b"].samples == 30
    assert rec.device_metrics == {"train_loss": 0.5}


def test_too_few_updates_fail_the_round_and_silent_devices_are_recorded():
    g = gate(min_updates=2)
    assert isinstance(g.check("a", "t1", make()), Accepted)
    closed = g.close()
    assert not closed.succeeded and closed.model_delta is None
    assert closed.record.state == "failed" and closed.record.model_version == 2
    assert {p.device: p.status for p in closed.record.participations} == {"a": "accepted", "b": "no_answer"}


def test_refusals_before_assembly_are_counted():
    g = gate()
    out = g.engine.refuse("a", "t1", "oversized", "announced 1 GB")
    assert out.reason == "oversized" and out.round == 4
    assert g.engine.rejected == {"oversized": 1} and g.engine.complete is False


def test_selected_device_gone_offline_is_dropped_and_the_round_completes_without_it():
    g = gate(selected=("a", "b"), target=2)
    assert isinstance(g.check("a", "t1", make()), Accepted)
    assert not g.engine.complete
    assert g.engine.drop("b") and g.engine.complete
    assert not g.engine.drop("b") and not g.engine.drop("c")  # counted once; c was not selected
    rec = g.close().record
    assert {p.device: p.status for p in rec.participations} == {"a": "accepted", "b": "dropped"}


def test_dropped_device_that_still_answers_in_time_is_accepted():
    g = gate(selected=("a", "b"), target=2)
    g.engine.drop("b")
    assert isinstance(g.check("b", "t2", make(device="b")), Accepted)
    rec = g.close().record
    assert {(p.device, p.status) for p in rec.participations} == {("a", "no_answer"), ("b", "accepted")}
