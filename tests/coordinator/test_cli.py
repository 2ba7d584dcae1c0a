"""`fedmq coordinator`: status of a real state folder in both forms, the state-folder
lock between two processes, one-line errors for bad flags."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from coordinator.cli import app
from coordinator.presence import Device
from coordinator.state import Checkpoint, ParticipationRecord, RoundRecord, StateDB, save_checkpoint
from coordinator.status import ago

ROOT = Path(__file__).resolve().parents[2]
WAIT = 60.0


def _config(tmp_path: Path, broker_url: str = "mqtt://127.0.0.1:1", **round_options: object) -> Path:
    extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in round_options.items())
    path = tmp_path / "coordinator.toml"
    path.write_text(f'federation = "lab"\ntask = "digits-mlp"\nrounds = 3\nstate_dir = "state"\n'
                    f'[broker]\nurl = "{broker_url}"\n[round]\n{extra}[publish]\nonnx = false\n')
    return path


def _record(round_: int, closed: float, parts: list[ParticipationRecord], accuracy: float | None) -> RoundRecord:
    rejected: dict[str, int] = {}
    for p in parts:
        if p.status == "rejected":
            rejected[p.reason] = rejected.get(p.reason, 0) + 1
    return RoundRecord(round=round_, state="closed", base_version=round_ - 1, model_version=round_, target=2,
                       participants=len(parts), accepted=sum(p.status == "accepted" for p in parts),
                       rejected=rejected, test_loss=0.5, test_accuracy=accuracy, device_metrics={},
                       bytes_up=sum(p.bytes_up for p in parts), bytes_down=1000 * len(parts), dense_bytes_up=9000,
                       started=closed - 4.0, closed=closed, wall_s=4.0, participations=parts)


def _state(tmp_path: Path) -> float:
    """A state folder as a coordinator leaves it after two rounds with three devices."""
    now = time.time()
    state = tmp_path / "state"
    db = StateDB(state)
    db.write_devices([Device("pi-01", online=True, task="digits-mlp", spec_hash="ab12", samples=300,
                             last_seen=now - 180),
                      Device("pi-02", online=False, task="digits-mlp", spec_hash="ab12", samples=250,
                             last_seen=now - 2 * 86400 - 60),
                      Device("pi-03", online=True, task="digits-mlp", spec_hash="ab12", samples=100,
                             last_seen=now - 20)])
    db.write_round(_record(1, now - 600, [ParticipationRecord("pi-01", "t1", "accepted", "", 300, 4100),
                                          ParticipationRecord("pi-02", "t2", "accepted", "", 250, 4000),
                                          ParticipationRecord("pi-03", "t3", "rejected", "stale", 100, 3900)], 0.61))
    db.write_round(_record(2, now - 300, [ParticipationRecord("pi-01", "t4", "accepted", "", 300, 4200),
                                          ParticipationRecord("pi-03", "", "no_answer")], 0.74))
    db.close()
    save_checkpoint(state, Checkpoint(2, 2, np.zeros(4, np.float32), {}, {"task": "digits-mlp"}))
    return now


def test_status_json_has_iso_times_and_the_fleet(tmp_path):
    now = _state(tmp_path)
    result = CliRunner().invoke(app, ["status", "-c", str(_config(tmp_path)), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["checkpoint"] == {"round": 2, "model_version": 2}
    assert doc["fleet"] == {"known": 3, "online": 2, "offline": 1}
    devices = {d["device"]: d for d in doc["devices"]}
    pi1, pi2, pi3 = devices["pi-01"], devices["pi-02"], devices["pi-03"]
    assert (pi1["rounds_taken_part"], pi1["accepted"], pi1["bytes_up"], pi1["rejected"]) == (2, 2, 8300, {})
    assert (pi3["rounds_taken_part"], pi3["accepted"], pi3["rejected"], pi3["no_answer"]) == (2, 0, {"stale": 1}, 1)
    assert not pi2["online"] and pi2["rounds_taken_part"] == 1
    seen = time.mktime(time.strptime(pi1["last_seen"], "%Y-%m-%dT%H:%M:%S+00:00")) - time.timezone
    assert abs(seen - (now - 180)) < 1.5 and 179 <= pi1["last_seen_age_s"] < 240
    s = doc["rounds_summary"]
    assert (s["rounds"], s["closed"], s["failed"], s["last_round"]) == (2, 2, 0, 2)
    assert (s["best_test_accuracy"], s["updates_accepted"], s["updates_rejected"]) == (0.74, 3, {"stale": 1})
    assert s["bytes_up"] == 4100 + 4000 + 3900 + 4200 and s["bytes_down"] == 5000
    assert doc["rounds"][0]["closed"].endswith("+00:00") and doc["generated_at"].endswith("+00:00")


def test_status_text_says_how_long_ago(tmp_path):
    _state(tmp_path)
    result = CliRunner().invoke(app, ["status", "-c", str(_config(tmp_path))])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "last finished round 2, model version 2" in out
    assert "fleet: 3 device(s), 2 online, 1 offline" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("pi-")}
    assert "3 min ago" in lines["pi-01"] and "2 d ago" in lines["pi-02"] and "s ago" in lines["pi-03"]
    assert "1 (stale: 1)" in lines["pi-03"] and "8,300" in lines["pi-01"]
    assert "rounds: 2 (2 closed, 0 failed)" in out and "best 74.00%" in out and "5 min ago" in out
    assert "e+09" not in out


def test_status_of_an_empty_folder_creates_nothing(tmp_path):
    result = CliRunner().invoke(app, ["status", "-c", str(_config(tmp_path)), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["checkpoint"] is None and doc["devices"] == [] and doc["rounds_summary"]["rounds"] == 0
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize(("delta", "text"), [(0.2, "just now"), (42, "42 s ago"), (185, "3 min ago"),
                                             (5 * 3600 + 10, "5 h ago"), (3 * 86400, "3 d ago"), (-7, "in 7 s")])
def test_ago(delta, text):
    assert ago(1_000_000.0 - delta, 1_000_000.0) == text
    assert ago(None, 0.0) == "never"


def _fedmq(*args: str, **kw: object) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "fedmq.cli", *args], capture_output=True, text=True, env=env,
                          timeout=WAIT, cwd=ROOT, **kw)


def test_second_coordinator_on_one_state_folder_exits_naming_folder_and_pid(tmp_path, mosquitto):
    cfg = _config(tmp_path, mosquitto.url, wait_for_devices_s=300.0)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    first = subprocess.Popen([sys.executable, "-m", "fedmq.cli", "coordinator", "run", "-c", str(cfg)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lock = tmp_path / "state" / "lock"
    try:
        deadline = time.monotonic() + WAIT
        while not (lock.is_file() and lock.read_text().strip() == str(first.pid)):
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline, "the first coordinator never took the lock"
            time.sleep(0.05)
        second = _fedmq("coordinator", "run", "-c", str(cfg))
        assert second.returncode == 2
        assert str(tmp_path / "state") in second.stderr and f"process {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr and len(second.stderr.strip().splitlines()) == 1
        assert first.poll() is None  # the first one was not disturbed
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(WAIT)
    assert first.returncode == 0
    # Released with its holder: the folder can be locked again.
    from coordinator.lock import lock_state_dir
    lock_state_dir(tmp_path / "state").close()


@pytest.mark.parametrize(("args", "accepted"), [
    (["run", "--log-level", "LOUD"], ["debug", "info", "warning", "error"]),
    (["export", "--format", "zip", "--out", "x"], ["onnx", "safetensors"]),
    (["status", "--last", "0"], ["greater than or equal to 1"]),
])
def test_bad_flags_are_one_line_with_the_accepted_values(tmp_path, args, accepted):
    result = _fedmq("coordinator", *args[:1], "-c", str(_config(tmp_path)), *args[1:])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"fedmq coordinator {args[0]}: error: ") and args[1] in lines[0]
    assert all(a in lines[0] for a in accepted), lines[0]
    assert not (tmp_path / "state").exists()


def test_run_with_no_devices_says_it_waits_and_stops_on_sigterm(tmp_path, mosquitto):
    # Not a terminal (pipes): the plain mode. wait_for_devices_s is short, so the old
    # behaviour (a failed round with 0 selected) would show as event=round_open.
    cfg = _config(tmp_path, mosquitto.url, wait_for_devices_s=0.2)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "fedmq.cli", "coordinator", "run", "-c", str(cfg)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + WAIT
        while True:
            line = proc.stderr.readline()
            assert line, f"coordinator exited {proc.wait(WAIT)} without saying it waits"
            if "waiting for devices: 0 eligible (0 online), 1 needed for round 1" in line:
                break
            assert time.monotonic() < deadline
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT)
    assert proc.returncode == 0
    assert "event=round_open" not in out
    assert "event=finished version=0 rounds_this_run=0 stopped=true" in out
    db = StateDB(tmp_path / "state")
    try:
        assert db.rounds() == []
    finally:
        db.close()
