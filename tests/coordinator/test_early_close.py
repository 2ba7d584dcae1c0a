"""Rounds that do not wait for the dead: a selected device killed mid-training (its last will
fires) is counted as dropped at once and the round closes when the live ones have answered."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import tomli_w

from coordinator.config import config_from_dict
from coordinator.service import Coordinator
from fedmq.data import load_npz, save_npz_atomic
from fleet.fleet import Fleet, FleetSpec

ROOT = Path(__file__).resolve().parents[2]
DEADLINE_S = 90.0


def test_round_closes_early_when_a_selected_device_dies(mosquitto, tmp_path: Path) -> None:
    spec = FleetSpec(broker_url=mosquitto.url, federation="early", devices=3, processes=1, seed=4,
                     work_dir=tmp_path / "fleet")
    cfg = config_from_dict({
        "federation": "early", "task": "digits-logreg", "rounds": 1, "seed": 1, "state_dir": str(tmp_path / "state"),
        "broker": {"url": mosquitto.url},
        "round": {"devices_per_round": 4, "over_selection": 1.0, "deadline_s": DEADLINE_S, "min_devices": 4,
                  "wait_for_devices_s": 120.0},
        "plan": {"local_epochs": 1, "lr": 0.1, "density": 0.5}, "publish": {"onnx": False}})
    with Fleet(spec) as fleet:
        assert fleet.wait_connected(3, 60.0), fleet.totals()
        # the fourth device: a real edge process that stops right after local training
        folder = tmp_path / "doomed"
        x, y = load_npz(spec.work_dir / "devices" / spec.device_id(0) / "data.npz")
        save_npz_atomic(folder / "data.npz", x, y)
        (folder / "edge.toml").write_text(tomli_w.dumps({
            "broker_url": mosquitto.url, "device_id": "doomed", "federation": "early", "task": "digits-logreg",
            "data": "data.npz", "state_dir": "state"}))
        pause = folder / "paused"
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", FEDMQ_EDGE_TEST_PAUSE_AT="training",
                   FEDMQ_EDGE_TEST_PAUSE_FILE=str(pause))
        doomed = subprocess.Popen([sys.executable, "-m", "edge_client", "run", "-c", str(folder / "edge.toml")],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            coordinator = Coordinator(cfg)
            out: dict = {}
            runner = threading.Thread(target=lambda: out.update(result=coordinator.run()))
            runner.start()
            end = time.monotonic() + 120.0
            while not pause.exists():
                assert time.monotonic() < end and doomed.poll() is None, "the fourth device never trained"
                time.sleep(0.02)  # polling a file another process writes; the deadline bounds it
            doomed.send_signal(signal.SIGKILL)
            doomed.wait(timeout=10)
            runner.join(timeout=DEADLINE_S + 30)
            assert not runner.is_alive()
        finally:
            if doomed.poll() is None:
                doomed.kill()
                doomed.wait()
    rec, = out["result"].records
    status = {p.device: p.status for p in rec.participations}
    assert status == {"doomed": "dropped", **{spec.device_id(i): "accepted" for i in range(3)}}
    assert rec.state == "closed" and rec.accepted == 3
    assert rec.wall_s < DEADLINE_S / 3, rec.wall_s
