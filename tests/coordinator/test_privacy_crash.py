"""kill -9 of the coordinator at every step of a round: the privacy ledger stays exact.

Four tests/coordinator/sim_device.py processes and the coordinator CLI talk through
mosquitto. The coordinator is killed once at each of its pause points (one per round, in
turn) and restarted; after every kill the checkpoint's ledger holds exactly one charge per
round the checkpoint finished, and at the end every round is charged once, with the event
of an uninterrupted run, and epsilon equals an independent dp-accounting computation.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dp_accounting
import pytest
from dp_accounting import rdp

from coordinator.service import ROUND_PAUSE_POINTS
from coordinator.state import load_checkpoint
from fleet.launch import write_toml

ROOT = Path(__file__).resolve().parents[2]
SIM = Path(__file__).with_name("sim_device.py")
TASK = "digits-logreg"


def _ledger(state: Path) -> list[dict[str, object]]:
    ckpt = load_checkpoint(state)
    assert ckpt is not None
    return json.loads(ckpt.meta["privacy"])["ledger"] if "privacy" in ckpt.meta else []


def _wait_for_file(path: Path, proc: subprocess.Popen[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the coordinator exited ({proc.returncode}) before pausing"
        assert time.monotonic() < deadline, f"no pause file {path} within {timeout} s"
        time.sleep(0.02)  # polling a file another process writes; the deadline bounds it


def test_privacy_ledger_is_exact_after_kill_9_at_every_step(mosquitto, tmp_path: Path, coordinator_cli,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    rounds = len(ROUND_PAUSE_POINTS) + 1
    cfg = tmp_path / "coordinator.toml"
    write_toml(cfg, {
        "federation": "dpcrash", "task": TASK, "rounds": rounds, "seed": 5, "state_dir": "state",
        "broker": {"url": mosquitto.url, "protocol": "5"},
        "round": {"devices_per_round": 3, "min_updates": 1, "deadline_s": 20.0, "min_devices": 4,
                  "wait_for_devices_s": 60.0},
        "plan": {"density": 0.1, "dense_below": 16}, "publish": {"onnx": False}, "evaluation": {"data": "none"},
        "privacy": {"enabled": True, "noise_multiplier": 1.0, "clip_norm": 0.5, "sampling": "without-replacement"}})
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    devices = [subprocess.Popen([sys.executable, str(SIM), mosquitto.url, "5", "dpcrash", f"dev-{i}", "good", TASK,
                                 "40"], env=env, stdout=subprocess.DEVNULL) for i in range(4)]
    try:
        for i, point in enumerate(ROUND_PAUSE_POINTS):
            pause = tmp_path / f"pause-{point}"
            monkeypatch.setenv("FEDMQ_COORDINATOR_TEST_PAUSE_AT", point)
            monkeypatch.setenv("FEDMQ_COORDINATOR_TEST_PAUSE_ROUND", str(i + 1))
            monkeypatch.setenv("FEDMQ_COORDINATOR_TEST_PAUSE_FILE", str(pause))
            proc = coordinator_cli(cfg)
            _wait_for_file(pause, proc, timeout=90)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            done = load_checkpoint(tmp_path / "state").round
            assert [c["round"] for c in _ledger(tmp_path / "state")] == list(range(1, done + 1)), point
        for name in ("FEDMQ_COORDINATOR_TEST_PAUSE_AT", "FEDMQ_COORDINATOR_TEST_PAUSE_ROUND",
                     "FEDMQ_COORDINATOR_TEST_PAUSE_FILE"):
            monkeypatch.delenv(name)
        proc = coordinator_cli(cfg)
        out, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, out
    finally:
        for p in devices:
            p.kill()
        for p in devices:
            p.wait(timeout=10)

    ledger = _ledger(tmp_path / "state")
    assert [c["round"] for c in ledger] == list(range(1, rounds + 1))
    assert all((c["population"], c["sample"], c["sigma"]) == (4, 3, 1.0) for c in ledger)
    ckpt = load_checkpoint(tmp_path / "state")
    closed = [line for line in out.splitlines() if line.startswith("event=round_closed")]
    final_eps = float(closed[-1].split("epsilon=")[1].split()[0])
    independent = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    independent.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.SampledWithoutReplacementDpEvent(4, 3, dp_accounting.GaussianDpEvent(0.5)), rounds))
    assert final_eps == pytest.approx(independent.get_epsilon(1e-5), rel=1e-5)
    assert ckpt.round == rounds
