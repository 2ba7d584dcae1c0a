"""kill -9 of the coordinator in the middle of a round, with the real edge clients.

Three `python -m edge_client` processes and the coordinator CLI talk through mosquitto
(MQTT 5, persistent sessions). The coordinator is killed once round 2 is open and
restarted: it resumes from round 1's checkpoint and reruns round 2. Devices whose round-2
update was already accepted by the killed coordinator must train again for the rerun (the
task has the same round and a later deadline), and devices whose update was in flight
resend it; so every round, the rerun included, aggregates all three devices.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import numpy as np

from coordinator.state import StateDB, load_checkpoint
from fedmq.data import save_npz_atomic
from fleet.demo import load_demo_data
from fleet.launch import Broker, Federation, coordinator_options, edge_options


def _wait_for_line(path: Path, text: str, timeout: float) -> None:
    """Wait (bounded) until the log file at ``path`` contains ``text``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.02)  # polling a file written by another process; the deadline bounds it
    raise AssertionError(f"{path}: no line with {text!r} within {timeout} s")


def test_coordinator_killed_mid_round_resumes_with_every_real_device(mosquitto, tmp_path: Path,
                                                                     coordinator_cli) -> None:
    ids = ["dev-0", "dev-1", "dev-2"]
    data = load_demo_data("digits", None, 1, "iid", 0.5)
    (x_all, y_all), = data.parts
    # dev-2 holds most of the data, so it answers well after the others: the coordinator can
    # be killed while dev-0's round-2 update is accepted but the round is still open.
    cuts = [(0, 120), (120, 240), (240, len(y_all))]
    broker = Broker(mosquitto.url, "5", "external")
    devices = {}
    for device, (a, b) in zip(ids, cuts):
        save_npz_atomic(tmp_path / "devices" / device / "data.npz", x_all[a:b], y_all[a:b])
        devices[device] = edge_options(device_id=device, federation="crash", task="digits-mlp", broker=broker,
                                       data="data.npz", seed=int(device[-1]))
    save_npz_atomic(tmp_path / "test.npz", data.x_test, data.y_test)
    fed = Federation.create(tmp_path, broker, devices_in="processes", devices=devices, coordinator=coordinator_options(
        federation="crash", task="digits-mlp", broker=broker, rounds=3, seed=1, state_dir="state",
        evaluation_data="test.npz", publish_onnx=False,
        round={"devices_per_round": 3, "min_updates": 3, "over_selection": 1.0, "deadline_s": 60.0,
               "min_devices": 3, "wait_for_devices_s": 120.0},
        plan={"local_epochs": 5, "lr": 0.1, "batch_size": 32}))
    cfg = fed.files.coordinator

    fed.devices.start_all()
    try:
        proc = coordinator_cli(cfg)
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("event=round_open round=2"):
                break
        _wait_for_line(tmp_path / "devices" / "dev-0" / "edge.log", "round 2: update accepted", timeout=60)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert load_checkpoint(tmp_path / "state").round in (1, 2)

        proc = coordinator_cli(cfg)
        out, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, out
    finally:
        fed.close()

    final = load_checkpoint(tmp_path / "state")
    assert final.round == 3 and np.isfinite(final.model).all()
    db = StateDB(tmp_path / "state")
    try:
        rounds = db.rounds()
    finally:
        db.close()
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert [(r["state"], r["accepted"]) for r in rounds] == [("closed", 3)] * 3, rounds
    assert rounds[-1]["test_accuracy"] > 0.5
