"""Edge configuration: TOML file, environment overrides, systemd directories, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_client.config import load_config
from fedmq.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]

BASE = """
broker_url = "mqtt://127.0.0.1:1884"
device_id = "dev-1"
federation = "fed"
task = "digits-mlp"
data = "data.npz"
state_dir = "state"
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "edge.toml"
    path.write_text(text)
    return path


def test_defaults_and_relative_paths(tmp_path):
    cfg = load_config(_write(tmp_path, BASE), environ={})
    assert cfg.protocol == "5" and cfg.torch_threads == 1 and cfg.holdout_fraction == 0.1
    assert cfg.data == tmp_path.resolve() / "data.npz"
    assert cfg.state_dir == tmp_path.resolve() / "state"
    assert cfg.username_file is None


def test_environment_overrides_every_kind_of_option(tmp_path):
    env = {"FEDMQ_EDGE_DEVICE_ID": "dev-9", "FEDMQ_EDGE_TORCH_THREADS": "3", "FEDMQ_EDGE_PROTOCOL": "3.1.1",
           "FEDMQ_EDGE_MAX_TRAIN_SECONDS": "12.5", "FEDMQ_EDGE_STATE_DIR": "/var/lib/x"}
    cfg = load_config(_write(tmp_path, BASE + "protocol = 5\n"), environ=env)
    assert (cfg.device_id, cfg.torch_threads, cfg.protocol, cfg.max_train_seconds) == ("dev-9", 3, "3.1.1", 12.5)
    assert cfg.state_dir == Path("/var/lib/x")


def test_systemd_directories(tmp_path):
    conf = tmp_path / "etc"
    conf.mkdir()
    _write(conf, BASE.replace('state_dir = "state"\n', "") + 'username_file = "user"\npassword_file = "pass"\n')
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "user").write_text("dev-1\n")
    (creds / "pass").write_text("secret\n")
    env = {"CONFIGURATION_DIRECTORY": str(conf), "STATE_DIRECTORY": "/var/lib/fedmq-edge",
           "CREDENTIALS_DIRECTORY": str(creds)}
    cfg = load_config(None, environ=env)
    assert cfg.state_dir == Path("/var/lib/fedmq-edge")
    assert cfg.username_file == creds / "user" and cfg.password_file == creds / "pass"


@pytest.mark.parametrize("extra, words", [
    ('torch_threads = 0\n', ["torch_threads", "FEDMQ_EDGE_TORCH_THREADS", "greater than or equal to 1"]),
    ('holdout_fraction = 0.9\n', ["holdout_fraction", "less than 0.5"]),
    ('protocol = "4"\n', ["protocol", "'5' or '3.1.1'"]),
    ('broker_url = "http://x"\n', ["broker_url", "scheme 'http' unsupported"]),
    ('colour = "blue"\n', ["colour", "unknown option"]),
    ('[broker]\nurl = "x"\n', ["broker", "flat"]),
    ('username_file = "nope"\n', ["username_file", "does not exist"]),
])
def test_bad_options_are_named(tmp_path, extra, words):
    text = BASE.replace('broker_url = "mqtt://127.0.0.1:1884"\n', "") if "broker_url" in extra else BASE
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, text + extra), environ={})
    for word in words:
        assert word in str(err.value)
    assert str(tmp_path / "edge.toml") in str(err.value)


def test_missing_required_and_bad_ids(tmp_path):
    with pytest.raises(ConfigError, match=r"'task'.*required"):
        load_config(_write(tmp_path, BASE.replace('task = "digits-mlp"\n', "")), environ={})
    with pytest.raises(ConfigError, match="device_id.*A-Za-z0-9"):
        load_config(_write(tmp_path, BASE), environ={"FEDMQ_EDGE_DEVICE_ID": "a/b"})


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.toml", environ={})
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_write(tmp_path, "device_id = \n"), environ={})
    with pytest.raises(ConfigError, match="-c FILE"):
        load_config(None, environ={})


def test_shipped_template_is_valid(tmp_path):
    creds = tmp_path / "creds"
    creds.mkdir()
    for name in ("username", "password", "ca.crt", "client.crt", "client.key"):
        (creds / name).write_text("x\n")
    cfg = load_config(ROOT / "deploy" / "edge.toml.example",
                      environ={"CREDENTIALS_DIRECTORY": str(creds), "STATE_DIRECTORY": str(tmp_path / "state")})
    assert cfg.task == "mnist-cnn" and cfg.broker_url.startswith("mqtts://")
