"""Edge configuration: TOML file, environment overrides, systemd directories, clear errors."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from edge_client.agent import broker_settings
from edge_client.config import load_config
from fedmq.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]

BASE = """
device_id = "dev-1"
federation = "fed"
task = "digits-mlp"
data = "data.npz"
state_dir = "state"
"""
BROKER = """
[broker]
url = "mqtt://127.0.0.1:1884"
"""


def _write(tmp_path: Path, text: str, broker: str = BROKER) -> Path:
    path = tmp_path / "edge.toml"
    path.write_text(text + broker)
    return path


def test_defaults_and_relative_paths(tmp_path):
    cfg = load_config(_write(tmp_path, BASE), environ={})
    assert cfg.broker_url == "mqtt://127.0.0.1:1884"
    assert cfg.protocol == "5" and cfg.torch_threads == 1 and cfg.holdout_fraction == 0.0
    assert cfg.data == tmp_path.resolve() / "data.npz"
    assert cfg.state_dir == tmp_path.resolve() / "state"
    assert cfg.username_file is None and cfg.keepalive == 30 and cfg.session_expiry == 604800


def test_broker_table_has_the_coordinators_names(tmp_path):
    for name in ("ca.crt", "dev.crt", "dev.key", "user", "pass"):
        (tmp_path / name).write_text("x\n")
    broker = """
[broker]
url = "mqtts://broker.lan"
protocol = 5
ca_file = "ca.crt"
cert_file = "dev.crt"
key_file = "dev.key"
username_file = "user"
password_file = "pass"
keepalive = 15
session_expiry = 60
"""
    cfg = load_config(_write(tmp_path, BASE, broker), environ={})
    base = tmp_path.resolve()
    assert (cfg.broker_url, cfg.protocol, cfg.keepalive, cfg.session_expiry) == ("mqtts://broker.lan", "5", 15, 60)
    assert (cfg.tls_ca, cfg.tls_cert, cfg.tls_key) == (base / "ca.crt", base / "dev.crt", base / "dev.key")
    assert (cfg.username_file, cfg.password_file) == (base / "user", base / "pass")


def test_old_flat_names_work_with_one_deprecation_warning_each(tmp_path, caplog):
    (tmp_path / "ca.crt").write_text("x\n")
    text = BASE + 'broker_url = "mqtts://broker.lan"\ntls_ca = "ca.crt"\nkeepalive = 15\n'
    path = _write(tmp_path, text, broker="")
    with caplog.at_level(logging.WARNING, logger="edge_client.config"):
        cfg = load_config(path, environ={})
        again = load_config(path, environ={})
    assert cfg == again and cfg.broker_url == "mqtts://broker.lan" and cfg.tls_ca == tmp_path.resolve() / "ca.crt"
    assert cfg.keepalive == 15
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sorted(warnings) == sorted([
        f"{path}: option 'broker_url' is deprecated, use 'broker.url' ([broker] table) (the old name keeps "
        "working for now)",
        f"{path}: option 'tls_ca' is deprecated, use 'broker.ca_file' ([broker] table) (the old name keeps "
        "working for now)",
        f"{path}: option 'keepalive' is deprecated, use 'broker.keepalive' ([broker] table) (the old name keeps "
        "working for now)"])


def test_old_and_new_name_together_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"'broker_url' and 'broker.url' both set; keep only 'broker.url'"):
        load_config(_write(tmp_path, BASE + 'broker_url = "mqtt://x"\n'), environ={})


def test_environment_overrides_every_kind_of_option(tmp_path):
    env = {"FEDMQ_EDGE_DEVICE_ID": "dev-9", "FEDMQ_EDGE_TORCH_THREADS": "3", "FEDMQ_EDGE_BROKER_PROTOCOL": "3.1.1",
           "FEDMQ_EDGE_MAX_TRAIN_SECONDS": "12.5", "FEDMQ_EDGE_STATE_DIR": "/var/lib/x",
           "FEDMQ_EDGE_BROKER_URL": "mqtt://elsewhere:1999", "FEDMQ_EDGE_BROKER_KEEPALIVE": "60",
           "FEDMQ_EDGE_TEST_PAUSE_AT": "training"}
    cfg = load_config(_write(tmp_path, BASE, BROKER + "protocol = 5\n"), environ=env)
    assert (cfg.device_id, cfg.torch_threads, cfg.protocol, cfg.max_train_seconds) == ("dev-9", 3, "3.1.1", 12.5)
    assert cfg.state_dir == Path("/var/lib/x") and cfg.broker_url == "mqtt://elsewhere:1999" and cfg.keepalive == 60


def test_old_environment_names_work_with_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="edge_client.config"):
        cfg = load_config(_write(tmp_path, BASE), environ={"FEDMQ_EDGE_PROTOCOL": "3.1.1"})
    assert cfg.protocol == "3.1.1"
    assert ("environment: variable FEDMQ_EDGE_PROTOCOL is deprecated, use FEDMQ_EDGE_BROKER_PROTOCOL (the old "
            "name keeps working for now)") in [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize(("var", "closest"), [
    ("FEDMQ_EDGE_DEVICEID", "FEDMQ_EDGE_DEVICE_ID (option 'device_id')"),
    ("FEDMQ_EDGE_BROKER_CAFILE", "FEDMQ_EDGE_BROKER_CA_FILE (option 'broker.ca_file')"),
    ("FEDMQ_EDGE_TORCH_THREAD", "FEDMQ_EDGE_TORCH_THREADS (option 'torch_threads')"),
])
def test_unknown_environment_variable_is_refused_naming_the_closest_option(tmp_path, var, closest):
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, BASE), environ={var: "1"})
    assert f"environment variable {var} matches no edge client option; did you mean {closest}?" in str(err.value)


def test_the_test_hook_variables_are_not_refused_as_options(tmp_path):
    # The fault-injection suite pauses a device at a step of one round with all three.
    env = {"FEDMQ_EDGE_TEST_PAUSE_AT": "training", "FEDMQ_EDGE_TEST_PAUSE_ROUND": "2",
           "FEDMQ_EDGE_TEST_PAUSE_FILE": str(tmp_path / "paused")}
    cfg = load_config(_write(tmp_path, BASE), environ=env)
    assert cfg.device_id


@pytest.mark.parametrize("extra, broker, words", [
    ('torch_threads = 0\n', BROKER, ["torch_threads", "FEDMQ_EDGE_TORCH_THREADS", "greater than or equal to 1"]),
    ('holdout_fraction = 0.9\n', BROKER, ["holdout_fraction", "less than 0.5"]),
    ("", BROKER + 'protocol = "4"\n', ["'broker.protocol' / $FEDMQ_EDGE_BROKER_PROTOCOL", "'5' or '3.1.1'"]),
    ("", '[broker]\nurl = "http://x"\n', ["'broker.url' / $FEDMQ_EDGE_BROKER_URL", "scheme 'http' unsupported"]),
    ('colour = "blue"\n', BROKER, ["colour", "unknown option"]),
    ('', BROKER + 'ca = "x"\n', ["'broker.ca'", "unknown option; did you mean 'ca_file'?"]),
    ('', BROKER + '[brokers]\n', ["[brokers] unknown", "did you mean 'broker'?"]),
    ('', BROKER + 'username_file = "nope"\n', ["'broker.username_file'", "does not exist"]),
])
def test_bad_options_are_named(tmp_path, extra, broker, words):
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, BASE + extra, broker), environ={})
    for word in words:
        assert word in str(err.value)
    assert str(tmp_path / "edge.toml") in str(err.value)


def test_systemd_directories(tmp_path):
    conf = tmp_path / "etc"
    conf.mkdir()
    _write(conf, BASE.replace('state_dir = "state"\n', ""), BROKER + 'username_file = "user"\npassword_file = "pass"\n')
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "user").write_text("dev-1\n")
    (creds / "pass").write_text("secret\n")
    env = {"CONFIGURATION_DIRECTORY": str(conf), "STATE_DIRECTORY": "/var/lib/fedmq-edge",
           "CREDENTIALS_DIRECTORY": str(creds)}
    cfg = load_config(None, environ=env)
    assert cfg.state_dir == Path("/var/lib/fedmq-edge")
    assert cfg.username_file == creds / "user" and cfg.password_file == creds / "pass"


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


def test_failover_urls_from_the_file_and_the_environment(tmp_path):
    path = _write(tmp_path, BASE, '[broker]\nurl = "mqtt://n0:1883"\nfailover_urls = ["mqtt://n1:1883", "n2:1884"]\n')
    cfg = load_config(path, environ={})
    assert broker_settings(cfg).urls == ("mqtt://n0:1883", "mqtt://n1:1883", "n2:1884")
    cfg = load_config(path, environ={"FEDMQ_EDGE_BROKER_FAILOVER_URLS": "mqtt://n3:1, mqtt://n4:2"})
    assert cfg.broker_failover_urls == ("mqtt://n3:1", "mqtt://n4:2")
    assert load_config(_write(tmp_path, BASE), environ={}).broker_failover_urls == ()
    with pytest.raises(ConfigError, match="broker.failover_urls"):
        load_config(_write(tmp_path, BASE, BROKER + 'failover_urls = ["ftp://n1"]\n'), environ={})
