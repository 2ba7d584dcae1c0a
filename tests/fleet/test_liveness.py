"""Liveness as an invariant (issue 27): seeded random schedules on the in-memory bus with a
virtual clock (fleet.liveness) settle every client update (within a round of the last time
it was sent) and never keep a round waiting for a device whose update already settled. A short budget here;
``FEDMQ_FAULTS_SCHEDULES`` in the fault suite (benchmarks/faults.py) runs thousands."""

from __future__ import annotations

from fleet.liveness import Schedule, run_schedule, run_schedules

#: Schedules CI plays (about 3 s on one core).
CI_SCHEDULES = 40


def test_random_schedules_settle_every_update_and_no_round_waits_for_a_settled_device():
    summary = run_schedules(range(CI_SCHEDULES))
    assert summary["violations"] == []
    assert summary["settled"] == summary["updates"] > 0
    # The schedules exercised every fault they draw, and rounds that failed or ran to their deadline.
    assert set(summary["faults"]) == {"coordinator_restart", "device_restart", "duplicate", "garbage", "slow"}
    assert summary["failed_rounds"] > 0 and summary["deadline_rounds"] > 0


def test_a_schedule_is_a_function_of_its_seed():
    assert Schedule.draw(7) == Schedule.draw(7) != Schedule.draw(8)
    first, again = run_schedule(7), run_schedule(7)
    assert (first.updates, first.rounds_played, first.faults) == (again.updates, again.rounds_played, again.faults)
