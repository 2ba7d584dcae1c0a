"""The CI subset of the fault-injection suite (benchmarks/faults.py; the whole campaign is
``python -m benchmarks run --suite faults``).

Each trial runs a real mosquitto (the shipped persistence settings), the real coordinator
process and three real edge-client processes on the digits task, faults one process at a
named step of round 2, and checks every invariant of benchmarks.faults against the
coordinator's SQLite database, the device ledgers and an uninterrupted reference run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import faults

pytestmark = [pytest.mark.faults, pytest.mark.timeout(400)]

#: (step, victim, mode): one trial per fix that a broken fleet once needed.
CI_TRIALS = (
    # mosquitto killed after the new model was published (before its autosave): the retained
    # model and round state are gone and the coordinator must restore them.
    ("model published", "broker", "kill"),
    # The coordinator killed while a device trains: the rerun round must reach the devices
    # that answered the interrupted one.
    ("training", "coordinator", "kill"),
    # A device killed right after publishing its update: after its restart it asks the
    # coordinator (one authority) instead of rolling back an aggregated update.
    ("update publish", "edge", "kill"),
    # A device stopped gracefully (SIGTERM) while it fetches the global model: the stop must
    # not mark the round done, or the restarted device ignores the round's task.
    ("model fetch", "edge", "term"),
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> faults.Reference:
    return faults.reference_run(tmp_path_factory.mktemp("faults-reference"))


@pytest.mark.parametrize(("step", "victim", "mode"), CI_TRIALS, ids=[" / ".join(t) for t in CI_TRIALS])
def test_fault_keeps_every_invariant(step: str, victim: str, mode: str, reference: faults.Reference,
                                     tmp_path: Path) -> None:
    _, host, point = next(s for s in faults.STEPS if s[0] == step)
    res = faults.run_trial(faults.Trial(step, host, point, victim, mode), tmp_path, reference)
    assert res.failures == [], "; ".join(res.details) + f" (logs in {tmp_path})"
    assert res.accepted == [len(faults.DEVICES)] * faults.ROUNDS
    assert res.stall_s <= faults.STALL_BOUND_S


def test_the_table_names_every_failure() -> None:
    trial = faults.Trial("training", "edge", "training", "broker", "kill")
    ok = faults.TrialResult(trial)
    bad = faults.TrialResult(trial, failures=["double", "stall"])
    text = faults.format_table([ok, bad])
    assert "training" in text and "broker" in text
    row = next(line for line in text.splitlines() if line.startswith("training"))
    assert row.split()[:4] == ["training", "broker", "2", "1"] and row.endswith("double 1, stall 1")
