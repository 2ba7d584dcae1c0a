"""The shared configuration loader: option catalogue, environment values, paths, old names."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from coordinator.config import SCHEMA as COORDINATOR
from coordinator.config import load_config
from edge_client.config import SCHEMA as EDGE
from fedmq.config.loader import REQUIRED, Option, env_value, fold_renamed
from fedmq.errors import ConfigError

BASE = 'federation = "lab"\ntask = "digits-mlp"\n'


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "conf" / "coordinator.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(BASE + text)
    return path


def test_the_catalogue_names_options_as_the_file_does_with_each_applications_defaults():
    coordinator, edge = COORDINATOR.options, EDGE.options
    assert coordinator["async.buffer_size"].default == 10 and "async_.buffer_size" not in coordinator
    assert coordinator["federation"].default is REQUIRED and coordinator["broker.session_expiry"].default == 0
    assert edge["broker.session_expiry"].default == 7 * 24 * 3600 and edge["broker.url"].default == \
        coordinator["broker.url"].default
    assert edge["device_id"].text and edge["data"].text and not edge["torch_threads"].text
    assert edge["broker.failover_urls"].listing and not edge["broker.url"].listing


@pytest.mark.parametrize(("text", "option", "value"), [
    ("20", Option("rounds", 10), 20),
    ("0.5", Option("x", 1.0), 0.5),
    ("true", Option("x", False), True),
    ("not toml", Option("x", 0), "not toml"),
    ("123", Option("device_id", REQUIRED, text=True), "123"),
    ('"quoted"', Option("task", REQUIRED, text=True), "quoted"),
    ("mqtt://a:1, mqtt://b:2", Option("urls", (), listing=True), ["mqtt://a:1", "mqtt://b:2"]),
    ('["mqtt://a:1"]', Option("urls", (), listing=True), ["mqtt://a:1"]),
])
def test_environment_values(text, option, value):
    assert env_value(text, option) == value


def test_every_table_is_reachable_from_the_environment_async_included(tmp_path):
    cfg = load_config(_write(tmp_path, ""), environ={"FEDMQ_COORDINATOR__ASYNC__BUFFER_SIZE": "4",
                                                     "FEDMQ_COORDINATOR__FEDERATION": "2024",
                                                     "FEDMQ_COORDINATOR__BROKER__FAILOVER_URLS": "mqtt://b:1"})
    assert cfg.async_.buffer_size == 4 and cfg.federation == "2024" and cfg.broker.failover_urls == ("mqtt://b:1",)


def test_relative_paths_follow_their_source_and_credentials_the_credentials_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "password").write_text("secret\n")
    path = _write(tmp_path, 'state_dir = "state"\n[broker]\nusername = "c"\npassword_file = "password"\n')
    cfg = load_config(path, environ={"CREDENTIALS_DIRECTORY": str(creds)})
    assert cfg.state_dir == path.resolve().parent / "state"
    assert cfg.broker.password_file == str(creds / "password") and cfg.broker.credentials() == ("c", "secret")
    cfg = load_config(path, environ={"CREDENTIALS_DIRECTORY": str(creds), "FEDMQ_COORDINATOR__STATE_DIR": "here"})
    assert cfg.state_dir == Path("here")
    with pytest.raises(ConfigError, match=r"option 'broker.password_file': file .*password does not exist"):
        load_config(path, environ={})


def test_an_environment_value_is_named_with_its_variable(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, ""), environ={"FEDMQ_COORDINATOR__ROUNDS": "0"})
    assert "rounds: Input should be greater than or equal to 1 (got 0, from $FEDMQ_COORDINATOR__ROUNDS)" in \
        str(err.value)
    with pytest.raises(ConfigError, match=r"round.deadline: unknown option; did you mean 'deadline_s'\?"):
        load_config(_write(tmp_path, "[round]\ndeadline = 3\n"), environ={})


def test_an_old_name_moves_to_the_new_one_once_and_never_beside_it():
    seen: list[tuple[str, str]] = []
    data = {"tls_ca": "ca.crt", "seed": 1}
    fold_renamed(data, {"tls_ca": "broker.ca_file"}, "f.toml", lambda old, new: seen.append((old, new)))
    assert data == {"seed": 1, "broker": {"ca_file": "ca.crt"}} and seen == [("tls_ca", "broker.ca_file")]
    with pytest.raises(ConfigError, match="'tls_ca' and 'broker.ca_file' both set; keep only 'broker.ca_file'"):
        fold_renamed({"tls_ca": "a", "broker": {"ca_file": "b"}}, {"tls_ca": "broker.ca_file"}, "f.toml",
                     lambda old, new: None)


def test_the_coordinators_test_hook_variables_are_no_options(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="fedmq.config.loader"):
        cfg = load_config(_write(tmp_path, ""), environ={"FEDMQ_COORDINATOR_TEST_PAUSE_AT": "publishing"})
    assert cfg.rounds == 10 and caplog.records == []
