"""The fault-injection points fire in FedBuff mode as in synchronous rounds: the round driver
takes every server step through the same points (coordinator/faults.py)."""

from __future__ import annotations

import secrets
import threading
from pathlib import Path

import pytest

from coordinator.config import config_from_dict
from coordinator.service import make_coordinator
from coordinator.state import load_checkpoint
from tests.coordinator.downlink_fleet import TASK, device_threads

STEPS, K, N = 3, 2, 3


@pytest.mark.parametrize("point", ["checkpoint_write", "model_publish", "receipt"])
def test_a_pause_point_fires_in_async_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, point: str) -> None:
    pause = tmp_path / "paused"
    monkeypatch.setenv("FEDMQ_COORDINATOR_TEST_PAUSE_AT", point)
    monkeypatch.setenv("FEDMQ_COORDINATOR_TEST_PAUSE_ROUND", "2")
    monkeypatch.setenv("FEDMQ_COORDINATOR_TEST_PAUSE_FILE", str(pause))
    url, fed = f"memory://aft-{secrets.token_hex(4)}", "aft"
    cfg = config_from_dict({
        "federation": fed, "task": TASK, "rounds": STEPS, "seed": 3, "state_dir": str(tmp_path / "coord"),
        "broker": {"url": url, "protocol": "5"}, "round": {"mode": "async"},
        "async": {"buffer_size": K, "concurrency": N, "max_staleness": 10, "task_timeout_s": 30.0},
        "plan": {"density": 0.1, "lr": 0.1}, "publish": {"onnx": False}, "evaluation": {"data": "none"}})
    fleet = device_threads(tmp_path, url, "5", fed, N)
    for i in range(N):
        fleet.start(i)
    coord = make_coordinator(cfg)
    out: dict = {}
    runner = threading.Thread(target=lambda: out.update(result=coord.run()), daemon=True)
    runner.start()
    try:
        paused = threading.Event()

        def watch() -> None:
            while runner.is_alive() and not pause.exists():
                paused.wait(0.02)  # a file the coordinator writes from its own thread; bounded below
            paused.set()

        threading.Thread(target=watch, daemon=True).start()
        assert paused.wait(120.0) and pause.exists(), "the coordinator never paused"
        assert pause.read_text() == point
        ckpt = load_checkpoint(cfg.state_dir)
        # Step 2 is paused: at "checkpoint_write" its checkpoint is not renamed yet; later it is.
        assert ckpt is not None and ckpt.round == (1 if point in ("checkpoint_write", "receipt") else 2)
        pause.unlink()
        runner.join(120.0)
        assert not runner.is_alive()
    finally:
        coord.stop()
        runner.join(30.0)
        fleet.stop_all()
    assert [r.round for r in out["result"].records] == list(range(1, STEPS + 1))
