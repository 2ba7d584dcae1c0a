"""Scaffold's control variates under kill -9 (benchmarks/faults.py's trials with ``[plan]
algorithm = "scaffold"``): every invariant of the fault suite (nothing aggregated twice, nothing
lost, every round, the final model bit-identical to an uninterrupted Scaffold run), plus the
device's own: its control variate is committed only with a transfer the coordinator aggregated.

A device killed after its receipt arrived (before it committed) and the coordinator killed
after its checkpoint (before it published the new model and control variate) both come back
with the same ``c_i`` and ``c``: the final model of round 3, trained with both, is the
reference run's bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.numpy import load as st_load

from benchmarks import faults
from edge_client.scaffold import FILE_NAME

pytestmark = [pytest.mark.faults, pytest.mark.timeout(600)]

SCAFFOLD = {"coordinator_overrides": {"plan": {"algorithm": "scaffold"}}}
TRIALS = (("receipt (edge)", "edge", "kill"), ("checkpoint rename", "coordinator", "kill"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> faults.Reference:
    return faults.reference_run(tmp_path_factory.mktemp("scaffold-reference"), **SCAFFOLD)


def committed_transfers(work: Path) -> dict[str, str]:
    """Device -> the transfer whose control variate it holds as committed ("" when none)."""
    out = {}
    for device in faults.DEVICES:
        state = work / "devices" / device / "state"
        data = (state / FILE_NAME).read_bytes()
        header = int.from_bytes(data[:8], "little")
        transfer = json.loads(data[8:8 + header])["__metadata__"]["transfer_id"]
        ledger = json.loads((state / "state.json").read_text())["ledger"]
        states = [e["state"] for e in ledger if e["transfer_id"] == transfer]
        assert st_load(data)["post.c"].any()
        out[device] = transfer if states and states[-1] == "accepted" else ""
    return out


@pytest.mark.parametrize(("step", "victim", "mode"), TRIALS, ids=[" / ".join(t) for t in TRIALS])
def test_control_variates_survive_kill_minus_9(step: str, victim: str, mode: str, reference: faults.Reference,
                                                tmp_path: Path) -> None:
    _, host, point = next(s for s in faults.STEPS if s[0] == step)
    res = faults.run_trial(faults.Trial(step, host, point, victim, mode), tmp_path, reference, **SCAFFOLD)
    assert res.failures == [], "; ".join(res.details) + f" (logs in {tmp_path})"
    assert res.accepted == [len(faults.DEVICES)] * faults.ROUNDS
    aggregated = faults.aggregated_updates(tmp_path)
    held = committed_transfers(tmp_path)
    assert all(held.values()), held  # every device committed its last round's c_i+
    assert all((device, transfer) in aggregated for device, transfer in held.items())
