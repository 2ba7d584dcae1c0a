"""Provisioning the coordinator's public key: ``fedmq coordinator seal-key`` makes it,
``fedmq broker add-device --coordinator-key`` writes it beside the device's credentials and
into its snippet, and the device's configuration loads it."""

from __future__ import annotations

import tomllib
from pathlib import Path

from typer.testing import CliRunner

from broker.cli import app as broker_app
from coordinator.cli import app as coordinator_app
from edge_client.config import load_config
from fedmq.security.sealing import fingerprint, load_or_create_key, load_public_key, pin_key

runner = CliRunner()


def test_add_device_writes_the_coordinator_key_the_device_pins(tmp_path: Path) -> None:
    coord_toml = tmp_path / "coordinator.toml"
    coord_toml.write_text('federation = "f"\ntask = "digits-mlp"\nstate_dir = "coordinator-state"\n')
    made = runner.invoke(coordinator_app, ["seal-key", "-c", str(coord_toml)])
    assert made.exit_code == 0, made.output
    public_path = Path(made.stdout.strip())
    assert public_path == tmp_path / "coordinator-state" / "seal-key.pub"
    # Asking again gives the same key.
    assert runner.invoke(coordinator_app, ["seal-key", "-c", str(coord_toml)]).stdout == made.stdout

    device_dir = tmp_path / "dev1"
    result = runner.invoke(broker_app, ["add-device", "dev1", "--federation", "f", "--passwd-file",
                                        str(tmp_path / "auth/passwd"), "--acl-file", str(tmp_path / "auth/acl"),
                                        "--out-dir", str(device_dir), "--broker-url", "mqtt://127.0.0.1:1883",
                                        "--hasher", "fedmq", "--coordinator-key", str(public_path)])
    assert result.exit_code == 0, result.output
    snippet = tomllib.loads(result.stdout)
    assert snippet["coordinator_key"] == "coordinator.pub"
    assert (device_dir / "coordinator.pub").read_bytes() == public_path.read_bytes()

    # The device's edge.toml: the snippet plus what it says to add (task, data, state_dir).
    lines = [f'{k} = "{v}"' for k, v in snippet.items() if not isinstance(v, dict)]
    lines += ['task = "digits-mlp"', 'data = "data.npz"', 'state_dir = "state"', "", "[broker]"]
    lines += [f'{k} = "{v}"' for k, v in snippet["broker"].items()]
    (device_dir / "edge.toml").write_text("\n".join(lines) + "\n")
    cfg = load_config(device_dir / "edge.toml", environ={})
    assert cfg.coordinator_key == device_dir / "coordinator.pub"
    key = load_public_key(cfg.coordinator_key)
    assert fingerprint(key) == fingerprint(load_or_create_key(tmp_path / "coordinator-state").public)
    pin_key(cfg.state_dir, key, "coordinator_key")


def test_add_device_refuses_a_bad_coordinator_key_and_writes_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "seal-key.pub"
    bad.write_text("-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")
    result = runner.invoke(broker_app, ["add-device", "dev1", "--passwd-file", str(tmp_path / "auth/passwd"),
                                        "--acl-file", str(tmp_path / "auth/acl"), "--out-dir", str(tmp_path / "dev1"),
                                        "--hasher", "fedmq", "--coordinator-key", str(bad)])
    assert result.exit_code == 1
    assert f"{bad}: the coordinator's public key is unreadable" in result.stderr
    assert not (tmp_path / "auth").exists() and not (tmp_path / "dev1").exists()


def test_add_device_without_a_coordinator_key_says_updates_travel_in_the_clear(tmp_path: Path) -> None:
    result = runner.invoke(broker_app, ["add-device", "dev1", "--passwd-file", str(tmp_path / "auth/passwd"),
                                        "--acl-file", str(tmp_path / "auth/acl"), "--out-dir", str(tmp_path / "dev1"),
                                        "--hasher", "fedmq", "--broker-url", "mqtt://127.0.0.1:1883"])
    assert result.exit_code == 0, result.output
    assert "coordinator_key" not in tomllib.loads(result.stdout)
    assert "travel in the clear" in result.stderr
