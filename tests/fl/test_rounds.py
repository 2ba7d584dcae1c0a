"""The round engine: every rejection reason triggered, the round's record and aggregate."""

import msgpack
import numpy as np

from fedmq.fl.rounds import REASONS, Accepted, Rejected, Repeat, RoundEngine, UpdateChecks
from fedmq.codecs import CodecSpec, encode
from fedmq.wire.envelope import ClientUpdate, encode_update
from fedmq.model.params import ParamSpec

SPEC = ParamSpec(("w", "b"), ((30, 40), (40,)), ("float32", "float32"))
OTHER = ParamSpec(("w",), ((7,),), ("float32",))
CFG = CodecSpec.of(name="topk-int8", density=0.1)


def make(device="a", round_=4, base=2, samples=10, kind="delta", fed="f", spec=SPEC, payload=None, scale=1.0):
    if payload is None:
        payload = encode(np.random.default_rng(0).normal(size=spec.size).astype(np.float32) * scale, spec, CFG)
    return encode_update(ClientUpdate(federation=fed, device=device, round=round_, base_version=base,
                                      samples=samples, kind=kind, spec_hash=spec.hash, codec="topk-int8",
                                      payload=payload, metrics={"train_loss": 0.5}))


class _Gate:
    """An engine with round 4 (base version 2) open for a and b; ``check`` is ``offer``."""

    def __init__(self, selected=("a", "b"), target=10, **kw):
        args = dict(kind="delta", is_known=lambda d: d in {"a", "b", "c"}, max_update_bytes=1 << 20)
        checks = {k: kw.pop(k) for k in ("norm_bound", "max_samples", "samples_of", "norm_factor", "norm_warmup",
                                         "norm_initial", "norms") if k in kw}
        args.update(kw)
        self.engine = RoundEngine("f", SPEC, round=3, base_version=2, checks=UpdateChecks(**checks), **args)
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
    payload = bytearray(encode(np.ones(SPEC.size, np.float32), SPEC, CodecSpec.of(name="none")))
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
    from pathlib import Path
    # busy and retained are the service's refusals: tests/coordinator/test_admission.py;
    # unsealed and bad_seal its sealing refusals: tests/coordinator/test_sealing.py.
    src = inspect.getsource(sys.modules[__name__])
    src += (Path(__file__).parents[1] / "coordinator" / "test_admission.py").read_text()
    src += (Path(__file__).parents[1] / "coordinator" / "test_sealing.py").read_text()
    assert all(f'"{r}")' in src or f'== "{r}"' in src for r in REASONS), [r for r in REASONS if f'"{r}"' not in src]


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


def test_admission_judges_a_manifest_before_anything_is_allocated():
    g = gate()
    e = g.engine
    assert e.admit("a", "t1", 1000) is None
    assert e.admit("a", "t1", 2 << 20).reason == "oversized"
    assert e.admit("z", "t1", 1000).reason == "unknown_device"
    assert e.admit("c", "t1", 1000).reason == "unselected"
    assert isinstance(g.check("a", "t1", make()), Accepted)
    # The same transfer again: its receipt at once, without assembling it again.
    assert e.admit("a", "t1", 1000) == Repeat("accepted", "", 4)
    assert e.admit("a", "t2", 1000).reason == "duplicate"
    g.close()
    # Between rounds: assembled and judged whole (it may be for the round about to open).
    assert e.admit("b", "t3", 1000) is None
    g.next_round(5, 3, ["c"])
    assert e.admit("a", "t1", 1000) == Repeat("accepted", "", 4)
    assert e.admit("b", "t4", 1000).reason == "late"
    # admit() records nothing: refuse() counts what the caller refuses.
    assert e.rejected == {}


def test_over_weighted_claims_are_rejected():
    # A cap from the configuration, and the device's own announced sample count.
    assert reason(gate(max_samples=100).check("a", "t", make(samples=2**63 - 1))) == "over_weighted"
    assert reason(gate(samples_of=lambda d: 50).check("a", "t", make(samples=51))) == "over_weighted"
    assert isinstance(gate(samples_of=lambda d: 50, max_samples=100).check("a", "t", make(samples=50)), Accepted)


def test_norm_bound_from_the_data_after_warm_up():
    g = gate(selected=("a", "b", "c"), norm_factor=10.0, norm_warmup=2, norm_initial=1e9)
    first = g.check("a", "t1", make(device="a"))
    assert isinstance(first, Accepted)
    # Still warming up: the initial bound holds.
    second = g.check("b", "t2", make(device="b", scale=5.0))
    assert isinstance(second, Accepted)
    median = float(np.median([first.norm, second.norm]))
    assert g.engine.current_norm_bound() == 10.0 * median
    assert reason(g.check("c", "t3", make(device="c", scale=1e4))) == "norm_bound"
    # No factor: no bound at all, as before.
    assert gate().engine.current_norm_bound() is None


def test_a_resend_is_answered_from_the_stored_outcome_after_the_memory_is_gone():
    # The coordinator restarted (a new engine) or the round left the engine's history: the
    # database still says the transfer was aggregated, and a resend hears that, never
    # "wrong_round", so the device does not roll back an update that is in the model.
    stored = {("a", "t1"): ("accepted", "", 1)}
    g = gate(lookup=lambda d, t: stored.get((d, t)))
    assert g.check("a", "t1", make(round_=1)) == Repeat("accepted", "", 1)
    assert reason(g.check("a", "t2", make(round_=1))) == "wrong_round"


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


def test_the_data_set_norm_bound_is_the_median_of_the_history_as_numpy_computes_it():
    """The bound is ``norm_factor`` x the median of the last accepted norms, with the value
    ``np.median`` gives (the middle one, or the mean of the two middle ones), bit for bit,
    for histories of odd and even length, full and not."""
    rng = np.random.default_rng(11)
    for length in (5, 6, 99, 100, 150):
        checks = UpdateChecks(norm_factor=3.5, norm_warmup=5)
        norms = rng.lognormal(3.0, 2.0, size=length)
        for norm in norms:
            checks.accepted(float(norm))
        history = norms[-100:]
        assert checks.current_norm_bound() == 3.5 * float(np.median(history))
