"""``fedmq broker run --mosquitto`` as a user runs it, in a child process: it renders the
shipped configuration into its own folder, starts mosquitto on loopback, serves
authenticated clients on both listeners, and stops mosquitto on SIGTERM; it refuses a
folder it did not make and bad flags before writing anything."""

from __future__ import annotations

import os
import signal
import subprocess
import queue
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from broker.cli import app
from broker.launch import free_port
from fedmq.wire import topics

ROOT = Path(__file__).resolve().parents[2]
WAIT = 20.0
#: Seconds the command may take to start: the fedmq CLI imports every app, torch included.
START = 90.0
runner = CliRunner()


def _accounts(folder: Path) -> None:
    for args in (["init-ca", folder / "certs"],
                 ["add-coordinator", "coord", "--federation", "f1", "--cert"],
                 ["add-device", "dev1", "--federation", "f1", "--cert"]):
        result = runner.invoke(app, [str(a) for a in args] + (["--passwd-file", str(folder / "auth/passwd"),
                                                                 "--acl-file", str(folder / "auth/acl"),
                                                                 "--ca-dir", str(folder / "certs"),
                                                                 "--out-dir", str(folder / args[1])]
                                                                if args[0] != "init-ca" else []))
        assert result.exit_code == 0, result.output


def _start(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "fedmq.cli", "broker", "run", "--mosquitto", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _ready_line(proc: subprocess.Popen[str]) -> str:
    """The line the command prints once mosquitto accepts on both listeners; fails with
    everything it printed if it exits first or stays silent for START seconds."""
    assert proc.stderr is not None
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in proc.stderr:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    seen = []
    deadline = time.monotonic() + START
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            pytest.fail(f"broker run --mosquitto printed no ready line within {START} s: {''.join(seen)}")
        seen.append(line)
        if "listening" in line:
            return line


def _alive(pid: int) -> bool:
    # The command reaps mosquitto before it exits; one it left behind would live on.
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_run_mosquitto_serves_authenticated_clients_and_stops_on_sigterm(tmp_path, peers):
    _accounts(tmp_path)
    run_dir = tmp_path / "run"
    plain_port, tls_port = free_port(), free_port()
    proc = _start("--dir", str(run_dir), "--config-dir", str(tmp_path), "--plain-port", str(plain_port),
                  "--tls-port", str(tls_port))
    try:
        line = _ready_line(proc)
        pid = int(line.split("(pid ")[1].split(")")[0])
        conf = (run_dir / "mosquitto.conf").read_text()
        assert f"listener {plain_port} 127.0.0.1\n" in conf and f"listener {tls_port} 127.0.0.1\n" in conf

        dev = tmp_path / "dev1"
        device = peers(tls_port, "dev1", None, tls={"ca_certs": str(dev / "ca.crt"),
                                                    "certfile": str(dev / "client.crt"),
                                                    "keyfile": str(dev / "client.key")})
        device.connect_ok()
        device.subscribe(topics.task("f1", "dev1"))
        coord = peers(plain_port, "coord", (tmp_path / "coord/password").read_text().strip())
        coord.connect_ok()
        coord.publish(topics.task("f1", "dev1"), b"task-1")
        device.until(topics.task("f1", "dev1"), b"task-1")
        kind, (reason, _) = peers(plain_port, "coord", "wrong").connect()
        assert kind == "connect" and reason.is_failure
    finally:
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(timeout=WAIT)
    assert status == 0
    assert not _alive(pid), "mosquitto outlived the command"
    assert (run_dir / "data" / "mosquitto.db").is_file()  # saved on the clean stop

    # A second run reuses its own folder.
    proc = _start("--dir", str(run_dir), "--config-dir", str(tmp_path), "--plain-port", str(plain_port),
                  "--tls-port", str(tls_port))
    try:
        _ready_line(proc)
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=WAIT) == 0


@pytest.mark.parametrize("args, expected", [
    (["--dir", "{tmp}/theirs"], "not empty and not made by 'fedmq broker run --mosquitto'"),
    (["--dir", "{tmp}/new", "--plain-bind", "0.0.0.0"], "--plain-bind '0.0.0.0' is not a loopback address"),
    (["--dir", "{tmp}/new", "--tls-port", "70000"], "--tls-port 70000 is out of range"),
    (["--dir", "{tmp}/new", "--tls-auth", "none"], "--tls-auth 'none' is unknown"),
    (["--dir", "{tmp}/new", "--config-dir", "{tmp}/empty"], "missing auth/passwd, auth/acl, certs/ca.crt"),
    (["--dir", "{tmp}/new", "--port", "1884"], "--host, --port and --verbose are options of the embedded broker"),
    ([], "--mosquitto needs --dir DIR"),
])
def test_run_mosquitto_refuses_before_writing(tmp_path, args, expected):
    _accounts(tmp_path)
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("mine")
    (tmp_path / "empty").mkdir()
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    result = runner.invoke(app, ["run", "--mosquitto", "--config-dir", str(tmp_path),
                                 *[a.replace("{tmp}", str(tmp_path)) for a in args]])
    assert result.exit_code == 1, result.output
    assert expected in result.stderr and "Traceback" not in result.output
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert (tmp_path / "theirs" / "notes.txt").read_text() == "mine"
