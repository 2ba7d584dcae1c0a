"""Edge configuration: TOML file, environment overrides, systemd directories, clear errors."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from edge_client.agent import broker_settings
from edge_client.config import EdgeConfig, load_config
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
    assert cfg.broker.url == "mqtt://127.0.0.1:1884"
    assert cfg.broker.protocol == "5" and cfg.torch_threads == 1 and cfg.holdout_fraction == 0.0
    assert cfg.data == tmp_path.resolve() / "data.npz"
    assert cfg.state_dir == tmp_path.resolve() / "state"
    assert cfg.broker.username_file is None and cfg.broker.keepalive == 30 and cfg.broker.session_expiry == 604800
    # No [broker] table at all: the device's defaults, a persistent session included.
    bare = load_config(_write(tmp_path, BASE, broker=""), environ={})
    assert bare.broker == broker_settings(bare) and bare.broker.persistent and bare.broker.url == "mqtt://127.0.0.1:1883"


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
    b = cfg.broker
    assert (b.url, b.protocol, b.keepalive, b.session_expiry) == ("mqtts://broker.lan", "5", 15, 60)
    assert (b.ca_file, b.cert_file, b.key_file) == (str(base / "ca.crt"), str(base / "dev.crt"), str(base / "dev.key"))
    assert (b.username_file, b.password_file) == (str(base / "user"), str(base / "pass"))


def test_old_flat_names_work_with_one_deprecation_warning_each(tmp_path, caplog):
    (tmp_path / "ca.crt").write_text("x\n")
    text = BASE + 'broker_url = "mqtts://broker.lan"\ntls_ca = "ca.crt"\nkeepalive = 15\n'
    path = _write(tmp_path, text, broker="")
    with caplog.at_level(logging.WARNING, logger="fedmq.config.loader"):
        cfg = load_config(path, environ={})
        again = load_config(path, environ={})
    assert cfg == again and cfg.broker.url == "mqtts://broker.lan"
    assert cfg.broker.ca_file == str(tmp_path.resolve() / "ca.crt") and cfg.broker.keepalive == 15
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sorted(warnings) == sorted([
        f"{path}: option 'broker_url' is deprecated, use 'broker.url' (the old name keeps working for now)",
        f"{path}: option 'tls_ca' is deprecated, use 'broker.ca_file' (the old name keeps working for now)",
        f"{path}: option 'keepalive' is deprecated, use 'broker.keepalive' (the old name keeps working for now)"])


def test_old_and_new_name_together_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"'broker_url' and 'broker.url' both set; keep only 'broker.url'"):
        load_config(_write(tmp_path, BASE + 'broker_url = "mqtt://x"\n'), environ={})


def test_environment_overrides_every_kind_of_option(tmp_path):
    env = {"FEDMQ_EDGE__DEVICE_ID": "dev-9", "FEDMQ_EDGE__TORCH_THREADS": "3", "FEDMQ_EDGE__BROKER__PROTOCOL": "3.1.1",
           "FEDMQ_EDGE__MAX_TRAIN_SECONDS": "12.5", "FEDMQ_EDGE__STATE_DIR": "/var/lib/x",
           "fedmq_edge__broker__url": "mqtt://elsewhere:1999", "FEDMQ_EDGE__BROKER__KEEPALIVE": "60",
           "FEDMQ_EDGE__SEED": "7", "FEDMQ_EDGE_TEST_PAUSE_AT": "training"}
    cfg = load_config(_write(tmp_path, BASE, BROKER + "protocol = 5\n"), environ=env)
    b = cfg.broker
    assert (cfg.device_id, cfg.torch_threads, b.protocol, cfg.max_train_seconds) == ("dev-9", 3, "3.1.1", 12.5)
    assert cfg.state_dir == Path("/var/lib/x") and b.url == "mqtt://elsewhere:1999" and b.keepalive == 60
    assert cfg.seed == 7


def test_a_text_option_from_the_environment_is_taken_as_written(tmp_path):
    # A device id of digits is text, not the number TOML would read.
    cfg = load_config(_write(tmp_path, BASE), environ={"FEDMQ_EDGE__DEVICE_ID": "0042", "FEDMQ_EDGE__TASK": '"x.y:z"'})
    assert (cfg.device_id, cfg.task) == ("0042", "x.y:z")


@pytest.mark.parametrize(("old", "new", "value"), [
    ("FEDMQ_EDGE_BROKER_PROTOCOL", "FEDMQ_EDGE__BROKER__PROTOCOL", "3.1.1"),  # the one-underscore convention
    ("FEDMQ_EDGE_PROTOCOL", "FEDMQ_EDGE__BROKER__PROTOCOL", "3.1.1"),  # fedmq 0.1's flat name
    ("FEDMQ_EDGE_DEVICE_ID", "FEDMQ_EDGE__DEVICE_ID", "dev-7"),
])
def test_old_environment_names_work_with_a_warning_naming_the_new_one(tmp_path, caplog, old, new, value):
    with caplog.at_level(logging.WARNING, logger="fedmq.config.loader"):
        cfg = load_config(_write(tmp_path, BASE), environ={old: value})
    assert value in (cfg.broker.protocol, cfg.device_id)
    assert (f"environment: variable {old} is deprecated, use {new} (the old name keeps working for now)"
            in [r.getMessage() for r in caplog.records])
    with pytest.raises(ConfigError, match=f"environment variables {old} and {new} both set; keep only {new}"):
        load_config(_write(tmp_path, BASE), environ={old: value, new: value})


@pytest.mark.parametrize(("var", "closest"), [
    ("FEDMQ_EDGE_DEVICEID", "FEDMQ_EDGE__DEVICE_ID (option 'device_id')"),
    ("FEDMQ_EDGE_BROKER_CAFILE", "FEDMQ_EDGE__BROKER__CA_FILE (option 'broker.ca_file')"),
    ("FEDMQ_EDGE__TORCH_THREAD", "FEDMQ_EDGE__TORCH_THREADS (option 'torch_threads')"),
    ("FEDMQ_EDGE__BROKER__CAFILE", "FEDMQ_EDGE__BROKER__CA_FILE (option 'broker.ca_file')"),
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
    ('torch_threads = 0\n', BROKER, ["torch_threads: Input should be greater than or equal to 1 (got 0)"]),
    ('holdout_fraction = 0.9\n', BROKER, ["holdout_fraction", "less than 0.5"]),
    ("", BROKER + 'protocol = "4"\n', ["broker: broker protocol '4' unsupported, expected one of ('5', '3.1.1')"]),
    ("", '[broker]\nurl = "http://x"\n', ["option 'broker.url': broker url 'http://x': scheme 'http' unsupported"]),
    ('colour = "blue"\n', BROKER, ["colour: unknown option"]),
    ('torch_thread = 2\n', BROKER, ["torch_thread: unknown option; did you mean 'torch_threads'?"]),
    ('', BROKER + 'ca = "x"\n', ["unknown option 'broker.ca'; did you mean 'ca_file'?"]),
    ('', BROKER + '[brokers]\n', ["brokers: unknown option; did you mean 'broker'?"]),
    ('', BROKER + 'username_file = "nope"\n', ["option 'broker.username_file': file", "does not exist"]),
    ('', BROKER + 'password_file = "edge.toml"\n', ["'broker.password_file' needs 'broker.username_file'"]),
    ('predict_tls_cert = "edge.toml"\n', BROKER, ["'predict_tls_cert' and 'predict_tls_key' go together"]),
])
def test_bad_options_are_named(tmp_path, extra, broker, words):
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, BASE + extra, broker), environ={})
    for word in words:
        assert word in str(err.value)
    assert str(tmp_path / "edge.toml") in str(err.value)


def test_a_value_from_the_environment_is_named_with_its_variable(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, BASE), environ={"FEDMQ_EDGE__TORCH_THREADS": "0"})
    assert "torch_threads: Input should be greater than or equal to 1 (got 0, from $FEDMQ_EDGE__TORCH_THREADS)" in \
        str(err.value)
    assert str(err.value).startswith(f"{tmp_path / 'edge.toml'} + environment overrides torch_threads: invalid edge "
                                     "client configuration:")


def test_relative_paths_from_the_environment_follow_the_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    conf = tmp_path / "etc"
    conf.mkdir()
    (tmp_path / "ca.crt").write_text("x\n")
    cfg = load_config(_write(conf, BASE, '[broker]\nurl = "mqtts://h"\n'),
                      environ={"FEDMQ_EDGE__DATA": "here.npz", "FEDMQ_EDGE__BROKER__CA_FILE": "ca.crt"})
    assert cfg.data == Path("here.npz") and cfg.state_dir == conf.resolve() / "state"
    assert cfg.broker.ca_file == "ca.crt"


def test_python_callers_may_still_pass_the_flat_broker_names(tmp_path):
    with pytest.warns(DeprecationWarning) as caught:
        cfg = EdgeConfig(broker_url="mqtt://h:1", protocol="3.1.1", device_id="d", federation="f", task="t",
                         data=tmp_path, state_dir=tmp_path)
    assert sorted(str(w.message) for w in caught) == [
        "configuration option 'broker_url' is deprecated, use 'broker.url'",
        "configuration option 'protocol' is deprecated, use 'broker.protocol'"]
    assert (cfg.broker.url, cfg.broker.protocol, cfg.broker.session_expiry) == ("mqtt://h:1", "3.1.1", 604800)
    assert EdgeConfig(broker={"url": "mqtt://h:1"}, device_id="d", federation="f", task="t", data=tmp_path,
                      state_dir=tmp_path).broker == cfg.broker.with_(protocol="5")


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
    assert cfg.broker.username_file == str(creds / "user") and cfg.broker.password_file == str(creds / "pass")
    # The file's own state_dir wins over $STATE_DIRECTORY, and the environment over both.
    assert load_config(None, environ={**env, "FEDMQ_EDGE__STATE_DIR": "/srv/x"}).state_dir == Path("/srv/x")


def test_missing_required_and_bad_ids(tmp_path):
    with pytest.raises(ConfigError, match=r"task: required option is missing"):
        load_config(_write(tmp_path, BASE.replace('task = "digits-mlp"\n', "")), environ={})
    with pytest.raises(ConfigError, match="device_id.*A-Za-z0-9"):
        load_config(_write(tmp_path, BASE), environ={"FEDMQ_EDGE__DEVICE_ID": "a/b"})


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
    assert cfg.task == "mnist-cnn" and cfg.broker.url.startswith("mqtts://")


def test_failover_urls_from_the_file_and_the_environment(tmp_path):
    path = _write(tmp_path, BASE, '[broker]\nurl = "mqtt://n0:1883"\nfailover_urls = ["mqtt://n1:1883", "n2:1884"]\n')
    cfg = load_config(path, environ={})
    assert broker_settings(cfg).urls == ("mqtt://n0:1883", "mqtt://n1:1883", "n2:1884")
    cfg = load_config(path, environ={"FEDMQ_EDGE__BROKER__FAILOVER_URLS": "mqtt://n3:1, mqtt://n4:2"})
    assert cfg.broker.failover_urls == ("mqtt://n3:1", "mqtt://n4:2")
    cfg = load_config(path, environ={"FEDMQ_EDGE__BROKER__FAILOVER_URLS": '["mqtt://n5:1"]'})
    assert cfg.broker.failover_urls == ("mqtt://n5:1",)
    assert load_config(_write(tmp_path, BASE), environ={}).broker.failover_urls == ()
    with pytest.raises(ConfigError, match="broker.failover_urls"):
        load_config(_write(tmp_path, BASE, BROKER + 'failover_urls = ["ftp://n1"]\n'), environ={})
