"""User tasks end to end: `fedmq demo --task ...` through real brokers with device processes,
by module:attribute and by entry point; `fedmq new` runs its README's first command; the
edge agent's start-time checks give the documented error and exit code (2)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import paho.mqtt.client as paho
import pytest
import tomli_w
from paho.mqtt.enums import CallbackAPIVersion

from fedmq.wire import topics
from fedmq.data import save_npz_atomic
from fedmq.wire.messages import ModelPointer, Status

from conftest import child_env, make_entry_point_dist  # type: ignore[import-not-found]

FEDMQ = [sys.executable, "-m", "fedmq.cli"]


def _demo(args: list[str], out: Path, env: dict[str, str], cwd: Path | None = None) -> dict:
    proc = subprocess.run([*FEDMQ, "demo", *args, "--out", str(out)], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


@pytest.mark.slow
@pytest.mark.timeout(450)
def test_user_task_by_module_attribute_federates(broker, tmp_path: Path) -> None:
    summary = _demo(["--task", "userpkg.sensors:classify", "--devices", "3", "--per-round", "3", "--rounds", "2",
                     "--broker", broker.url, "--protocol", broker.protocol], tmp_path, child_env())
    assert summary["task"] == "user-classify" and summary["rounds"] == 2 and summary["rounds_failed"] == 0
    assert summary["updates_accepted"] >= 4
    assert summary["final_accuracy"] > summary["initial_accuracy"] + 0.2
    # Every device read its partition with the task's loader and reported the task's own name.
    for log in (tmp_path / "devices").glob("*/edge.log"):
        assert "task user-classify" in log.read_text()


@pytest.mark.slow
@pytest.mark.timeout(450)
def test_regression_task_by_entry_point_learns(mosquitto, tmp_path: Path) -> None:
    site = make_entry_point_dist(tmp_path / "site", "user-regress-ep", "userpkg.sensors:regress")
    summary = _demo(["--task", "user-regress-ep", "--devices", "3", "--per-round", "3", "--rounds", "2",
                     "--codec", "none", "--broker", mosquitto.url, "--protocol", "5"], tmp_path / "out",
                    child_env(site))
    assert summary["task"] == "user-regress" and summary["initial_accuracy"] is None
    assert summary["final_loss"] < 0.5 * summary["initial_loss"]
    assert (tmp_path / "out" / "devices" / "device-00" / "data.csv").is_file()


@pytest.mark.slow
@pytest.mark.timeout(450)
def test_fedmq_new_project_runs_its_readme(tmp_path: Path) -> None:
    env = child_env()
    made = subprocess.run([*FEDMQ, "new", "plant"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert made.returncode == 0, made.stderr
    assert {p.name for p in (tmp_path / "plant").iterdir()} >= {"task.py", "coordinator.toml", "edge.toml", "README.md"}
    again = subprocess.run([*FEDMQ, "new", "plant"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert again.returncode == 2 and "exists and is not an empty folder" in again.stderr
    readme = (tmp_path / "plant" / "README.md").read_text()
    first = re.search(r"```\s*\n\s*(fedmq demo [^\n]*)\n", readme)
    assert first is not None, readme
    args = shlex.split(first.group(1))[2:]
    assert args[:2] == ["--task", "plant.task:task"]
    summary = _demo(args, tmp_path / "out", env, cwd=tmp_path)
    assert summary["task"] == "plant" and summary["rounds_failed"] == 0
    assert summary["final_loss"] < 0.5 * summary["initial_loss"]


def _edge(tmp_path: Path, task: str, data: Path, broker_url: str = "mqtt://127.0.0.1:9", protocol: str = "5",
          timeout: float = 120) -> subprocess.CompletedProcess[str]:
    cfg = tmp_path / "edge.toml"
    cfg.write_text(tomli_w.dumps({"broker_url": broker_url, "protocol": protocol, "device_id": "dev-1",
                                  "federation": "fed", "task": task, "data": str(data), "state_dir": "state"}))
    return subprocess.run([sys.executable, "-m", "edge_client", "run", "-c", str(cfg)], capture_output=True,
                          text=True, env=child_env(), timeout=timeout)


def test_wrong_shape_wrong_labels_and_failed_import_exit_2(tmp_path: Path) -> None:
    data = tmp_path / "data.npz"
    save_npz_atomic(data, np.zeros((10, 9), np.float32), np.zeros(10, np.int64))
    out = _edge(tmp_path, "userpkg.sensors:classify", data)
    assert out.returncode == 2
    assert re.search(r"edge.toml: option 'data' \(.*data.npz\): samples of shape \(9,\), expected \(8,\)", out.stderr)
    assert "Traceback" not in out.stderr

    save_npz_atomic(data, np.zeros((10, 8), np.float32), np.arange(10))
    out = _edge(tmp_path, "userpkg.sensors:classify", data)
    assert out.returncode == 2 and "label 9 out of range, expected 0..2 (3 classes)" in out.stderr

    out = _edge(tmp_path, "userpkg.broken:task", data)
    assert out.returncode == 2
    assert re.search(r"edge.toml: option 'task': cannot import task module 'userpkg.broken'.*fedmq_no_such_dependency",
                     out.stderr)
    assert "Traceback" not in out.stderr


def test_device_with_another_task_refuses_and_says_why(mosquitto, tmp_path: Path) -> None:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="fake-coordinator", protocol=paho.MQTTv5)
    client.connect("127.0.0.1", mosquitto.port)
    client.loop_start()
    try:
        pointer = ModelPointer(version=0, spec_hash="0123456789abcdef", round=0, size=1, sha256="0" * 64)
        client.publish(topics.model_latest("fed"), pointer.to_bytes(), qos=1, retain=True).wait_for_publish(10)
        statuses: list[Status] = []
        got = threading.Event()

        def on_message(_c: object, _u: object, msg: paho.MQTTMessage) -> None:
            status = Status.from_bytes(msg.payload)
            statuses.append(status)
            if status.refusal and not status.online:
                got.set()

        client.on_message = on_message
        client.subscribe(topics.status("fed", "dev-1"), qos=1)
        data = tmp_path / "data.npz"
        save_npz_atomic(data, np.zeros((10, 8), np.float32), np.zeros(10, np.int64))
        out = _edge(tmp_path, "userpkg.sensors:classify", data, broker_url=mosquitto.url)
        assert out.returncode == 2
        assert re.search(r"option 'task': task 'user-classify' has ParamSpec [0-9a-f]{16}, the federation's global "
                         r"model \(fedmq/fed/model/latest\) has 0123456789abcdef", out.stderr)
        assert got.wait(10), statuses
        assert "0123456789abcdef" in statuses[-1].refusal and statuses[-1].task == "user-classify"
    finally:
        client.loop_stop()
        client.disconnect()
