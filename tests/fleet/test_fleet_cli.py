"""``fedmq fleet run``: a fleet and a coordinator from two files; bad options are named."""

from __future__ import annotations

import json
from pathlib import Path

import tomli_w
from typer.testing import CliRunner

from fleet.cli import app


def test_fleet_run_with_a_coordinator_writes_its_summary(mosquitto, tmp_path: Path) -> None:
    fleet_toml = tmp_path / "fleet.toml"
    fleet_toml.write_text(tomli_w.dumps({
        "broker_url": mosquitto.url, "federation": "cli", "devices": 4, "processes": 1, "seed": 2,
        "work_dir": str(tmp_path / "work"), "heterogeneity": {"compute_s": 0.1, "speed_sigma": 0.5}}))
    coord_toml = tmp_path / "coordinator.toml"
    coord_toml.write_text(tomli_w.dumps({
        "federation": "cli", "task": "digits-logreg", "rounds": 2, "state_dir": str(tmp_path / "state"),
        "broker": {"url": mosquitto.url}, "round": {"mode": "async"}, "async": {"buffer_size": 2, "concurrency": 4},
        "evaluation": {"data": str(tmp_path / "work" / "test.npz")}, "publish": {"onnx": False}}))
    res = CliRunner().invoke(app, ["run", "-c", str(fleet_toml), "--coordinator", str(coord_toml),
                                   "--connect-timeout", "60"])
    assert res.exit_code == 0, res.output
    events = [json.loads(line) for line in res.output.splitlines() if line.startswith("{")]
    assert [e["event"] for e in events] == ["connected", "round", "round", "stopped"]
    assert events[0]["all"] is True and events[0]["connected"] == 4
    summary = json.loads((tmp_path / "work" / "summary.json").read_text())
    assert [r["accepted"] for r in summary["rounds"]] == [2, 2] and summary["trainings"] >= 4


def test_bad_fleet_option_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "fleet.toml"
    bad.write_text('broker_url = "mqtt://127.0.0.1:1"\nfederation = "x"\ndevices = 0\nwork_dir = "w"\n'
                   '[heterogeneity]\nspeed = 2\n')
    res = CliRunner().invoke(app, ["run", "-c", str(bad)])
    assert res.exit_code == 2
    assert "devices" in res.output and "heterogeneity.speed" in res.output
