"""Fault trials of secure rounds (benchmarks.faults.SECURE_STEPS; the whole matrix: ``python
-m benchmarks.faults`` with the secure steps): the coordinator killed (SIGKILL) once its
unmasking request is on record but not sent, a device killed once its masked input is
durable but not published, and a device killed while the coordinator holds the sum. Each trial checks benchmarks.faults' secure invariants: every
round closed with the exact sum of its survivors or failed, no request that could reveal an
input, every masked input settled, the model as the reference's or as accurate."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import faults

pytestmark = [pytest.mark.faults, pytest.mark.timeout(400)]

CI_TRIALS = (("secagg unmask request", "coordinator", "kill"), ("secagg input (edge)", "edge", "kill"),
             # A device killed while the coordinator holds the round's sum: it comes back after
             # the last round, whose result (it was not in it) must not hide the one that
             # settles its input.
             ("secagg sum", "edge", "kill"),
             # The coordinator killed after the round's checkpoint, before its result went out:
             # the restarted coordinator tells the devices from the checkpoint.
             ("secagg checkpoint", "coordinator", "kill"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> faults.Reference:
    return faults.reference_run(tmp_path_factory.mktemp("secure-reference"), coordinator_overrides=faults.SECURE)


@pytest.mark.parametrize(("step", "victim", "mode"), CI_TRIALS, ids=[" / ".join(t) for t in CI_TRIALS])
def test_secure_fault_keeps_every_invariant(step: str, victim: str, mode: str, reference: faults.Reference,
                                            tmp_path: Path) -> None:
    _, host, point = next(s for s in faults.SECURE_STEPS if s[0] == step)
    res = faults.run_trial(faults.Trial(step, host, point, victim, mode), tmp_path, reference,
                           coordinator_overrides=faults.SECURE)
    assert res.failures == [], "; ".join(res.details) + f" (logs in {tmp_path})"
