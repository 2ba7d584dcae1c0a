"""The federation launcher (fleet/launch.py): configurations the real loaders read, brokers it
starts and restarts, devices on threads that stop and start again.

Whole federations through it are run by tests/fleet/test_demo.py and test_simulator.py
(``fedmq demo``), tests/faults (processes under kill -9) and the downlink tests
(tests/coordinator/downlink_fleet.py)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from coordinator.config import load_config as load_coordinator_config
from edge_client.config import load_config as load_edge_config
from fedmq.data import load_split, save_npz_atomic
from broker import credentials as cred
from fedmq.errors import BrokerConnectError, ConfigError
from fedmq.transport import BrokerSettings, MqttLink
from fleet.launch import (Federation, coordinator_options, edge_options, merge_tables, start_broker,
                          write_federation)


def test_tables_are_merged_key_by_key_and_nothing_given_is_changed() -> None:
    base = {"round": {"deadline_s": 60.0, "min_updates": 3}, "rounds": 30}
    over = {"round": {"deadline_s": 5.0}, "rounds": 2, "plan": {"lr": 0.1}}
    assert merge_tables(base, over) == {"round": {"deadline_s": 5.0, "min_updates": 3}, "rounds": 2,
                                        "plan": {"lr": 0.1}}
    assert base == {"round": {"deadline_s": 60.0, "min_updates": 3}, "rounds": 30}


def test_both_configurations_are_what_the_applications_read(tmp_path: Path) -> None:
    broker = start_broker("memory", tmp_path)
    try:
        files = write_federation(tmp_path, coordinator_options(
            federation="fed", task="digits-logreg", broker=broker, rounds=4, seed=7, state_dir="state",
            evaluation_data="test.npz", publish_onnx=False, round={"devices_per_round": 2, "deadline_s": 9.0}),
            {"dev-a": edge_options(device_id="dev-a", federation="fed", task="digits-logreg", broker=broker,
                                   data="data.npz", seed=3, holdout_fraction=0.0)})
        coordinator = load_coordinator_config(files.coordinator, environ={})
        edge = load_edge_config(files.devices["dev-a"], environ={})
    finally:
        broker.close()
    assert (coordinator.federation, coordinator.rounds, coordinator.seed) == ("fed", 4, 7)
    assert coordinator.broker.url == broker.url and coordinator.round.devices_per_round == 2
    assert coordinator.round.deadline_s == 9.0
    assert (edge.device_id, edge.broker.url, edge.seed, edge.holdout_fraction) == ("dev-a", broker.url, 3, 0.0)
    # Relative paths resolve in the folder of the file that names them.
    assert edge.data == tmp_path / "devices" / "dev-a" / "data.npz"


def test_device_processes_on_the_in_memory_bus_are_refused(tmp_path: Path) -> None:
    broker = start_broker("memory", tmp_path)
    try:
        with pytest.raises(ConfigError, match="threads"):
            Federation.create(tmp_path, broker, coordinator=None, devices={}, devices_in="processes")
    finally:
        broker.close()


def test_a_device_thread_stops_and_starts_again_in_this_process(tmp_path: Path) -> None:
    # A stopped device lets go of its state folder: the same device starts again here.
    x, y, _, _ = load_split("digits")
    save_npz_atomic(tmp_path / "shard.npz", x[:40], y[:40])
    broker = start_broker("memory", tmp_path)
    device = edge_options(device_id="dev-a", federation="fed", task="digits-logreg", broker=broker,
                          data=tmp_path / "shard.npz", seed=0)
    with Federation.create(tmp_path, broker, coordinator=None, devices={"dev-a": device},
                          devices_in="threads") as fed:
        first = fed.devices.start("dev-a")
        fed.devices.stop("dev-a")
        second = fed.devices.start(0, receipt_timeout=3.0)
        assert second is not first and second.cfg.receipt_timeout == 3.0
    assert fed.devices.errors == []


def test_a_killed_mosquitto_comes_back_on_the_same_url(tmp_path: Path) -> None:
    broker = start_broker("mosquitto", tmp_path, mosquitto_conf="autosave_interval 60")
    try:
        assert broker.kind == "mosquitto" and broker.protocol == "5"
        broker.restart("kill")
        with socket.create_connection((broker.process.host, broker.process.port), timeout=5):
            pass
    finally:
        broker.close()
    assert not broker.process.running()


def test_a_mosquitto_with_a_security_section_admits_only_its_accounts(tmp_path: Path) -> None:
    # The robust benchmark's brokers: one account per device, no anonymous client.
    passwd = tmp_path / "passwd"
    cred.set_password(passwd, "dev-a", "right-password", hasher="fedmq")
    (tmp_path / "password").write_text("right-password\n")
    broker = start_broker("mosquitto", tmp_path, mosquitto_security=f"allow_anonymous false\npassword_file {passwd}")
    try:
        MqttLink(BrokerSettings(url=broker.url, username="dev-a", password_file=str(tmp_path / "password")),
                 "dev-a").connect(timeout=10.0).close()
        with pytest.raises(BrokerConnectError, match="refused"):
            MqttLink(BrokerSettings(url=broker.url), "anonymous").connect(timeout=10.0)
    finally:
        broker.close()


def test_a_running_broker_is_named_not_started(tmp_path: Path) -> None:
    broker = start_broker("mqtt://127.0.0.1:1", tmp_path, protocol="3.1.1")
    assert (broker.kind, broker.url, broker.protocol, broker.process) == ("external", "mqtt://127.0.0.1:1", "3.1.1",
                                                                          None)
    with pytest.raises(ConfigError, match="external"):
        broker.restart("kill")
    broker.close()
    assert not (tmp_path / "broker").exists()
