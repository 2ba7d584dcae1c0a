"""Every answer names the round of the update it answers (issue 27): refusals decided at
admission from the round the manifest names, refusals of unreadable envelopes, the service's
``busy`` and ``retained``, the database's answer to a resend, the buffered engine."""

from __future__ import annotations

from coordinator.state import StateDB
from fedmq.fl.buffered import BufferedEngine
from fedmq.fl.rounds import Accepted, Rejected, RoundEngine
from tests.fl.test_rounds import SPEC, make


def engine(selected=("a", "b")) -> RoundEngine:
    e = RoundEngine("f", SPEC, kind="delta", is_known=lambda d: d in {"a", "b", "c"}, max_update_bytes=1 << 20,
                    round=3, base_version=2)
    e.open(4, 2, list(selected), 10, deadline=100.0, started=0.0)
    return e


def named(outcome) -> tuple[str, int]:
    assert isinstance(outcome, Rejected), outcome
    return outcome.reason, outcome.round


def test_admission_refusals_name_the_round_the_manifest_names():
    e = engine(selected=("a", "b"))
    e.refuse("a", "garbage", "malformed", "blob manifest: not msgpack")   # a's answer to round 4
    assert "a" in e.answered
    e.close(1.0)
    e.open(5, 3, ["b"], 10, deadline=200.0, started=100.0)
    # a's genuine round-4 update, after round 5 opened without it: late, for round 4.
    assert named(e.admit("a", "t4", 100, 4)) == ("late", 4)
    # Without a round in the manifest the refusal can only name the round in progress.
    assert named(e.admit("a", "t4", 100)) == ("late", 5)
    assert named(e.admit("c", "tc", 100, 5)) == ("unselected", 5)
    assert named(e.admit("b", "tb", 100, 2)) == ("wrong_round", 2)
    assert named(e.admit("a", "big", 2 << 20, 4)) == ("oversized", 4)
    assert e.admit("b", "tb", 100, 5) is None
    assert isinstance(e.offer("b", "tb", make(device="b", round_=5, base=3)), Accepted)


def test_a_second_update_in_the_round_is_a_duplicate_of_that_round_and_an_older_one_late():
    e = engine(selected=("a", "b"))
    e.offer("a", "t4", make(device="a", round_=4))
    e.close(1.0)
    e.open(5, 3, ["a", "b"], 10, deadline=200.0, started=100.0)
    e.offer("a", "t5", make(device="a", round_=5, base=3))
    assert named(e.admit("a", "t5b", 100, 5)) == ("duplicate", 5)
    assert named(e.admit("a", "t4b", 100, 4)) == ("late", 4)


def test_refusals_of_the_service_and_of_unreadable_envelopes_name_the_manifest_round():
    e = engine()
    e.close(1.0)
    e.open(5, 3, ["a", "b"], 10, deadline=200.0, started=100.0)
    assert named(e.refuse("a", "t4", "busy", "limits", 4)) == ("busy", 4)
    assert named(e.refuse("c", "tr", "retained", "retained", None)) == ("retained", 5)
    assert named(e.offer("b", "tx", b"\x00garbage", 4)) == ("malformed", 4)
    # None names the round in progress for a selected device: none is a's or b's answer to it.
    assert not e.answered
    # A busy refusal for the round in progress is the device's answer when the service says
    # so (none of its transfers in assembly: it settles and sends nothing more).
    e.refuse("b", "t5b", "busy", "limits", 5)
    assert not e.answered
    e.refuse("a", "t5", "busy", "limits", 5, answered=True)
    assert e.answered == {"a"}
    rec = e.close(2.0).record
    rounds = {p.transfer_id: p.metrics.get("task_round") for p in rec.participations}
    assert rounds["t4"] == 4.0 and rounds["tx"] == 4.0 and rounds["t5"] is None


def test_the_database_answers_a_resend_with_the_round_its_receipt_named(tmp_path):
    e = engine(selected=("a",))
    e.close(1.0)
    e.open(5, 3, ["b"], 10, deadline=200.0, started=100.0)
    e.refuse("a", "t4", "late", "round 4 is closed", 4)
    db = StateDB(tmp_path)
    try:
        db.write_round(e.close(2.0).record)
        assert db.transfer_outcome("a", "t4") == ("rejected", "late", 4)
        fresh = RoundEngine("f", SPEC, kind="delta", is_known=lambda d: True, max_update_bytes=1 << 20, round=5,
                            base_version=3, lookup=db.transfer_outcome)
        fresh.open(6, 3, ["b"], 10, deadline=300.0, started=200.0)
        repeat = fresh.admit("a", "t4", 100, 4)
        assert (repeat.status, repeat.reason, repeat.round) == ("rejected", "late", 4)
    finally:
        db.close()


def test_buffered_refusals_name_the_manifest_round():
    e = BufferedEngine("f", SPEC, kind="delta", is_known=lambda d: d != "x", max_update_bytes=1 << 20, buffer_size=2,
                       task_round_of=lambda d: 9)
    assert named(e.admit("a", "t", 2 << 20, 7)) == ("oversized", 7)
    assert named(e.refuse("a", "t2", "busy", "limits", 6)) == ("busy", 6)
    assert named(e.refuse("a", "t3", "busy", "limits")) == ("busy", 9)
    assert named(e.offer("a", "t4", b"\x00garbage", 5)) == ("malformed", 5)
