"""Compressed downlink end to end: coordinator and edge agents hold bit-identical global
models (SHA-256 of the float32 parameter vector) for every version, on the in-memory bus
(fast) and through a real mosquitto."""

from __future__ import annotations

import logging
import secrets
import signal
import time
from pathlib import Path

import pytest

from coordinator.service import Coordinator, Progress
from coordinator.state import load_checkpoint
from fedmq.wire import topics
from fedmq.fl.chain import DeltaBlob, ModelChain
from fedmq.fl.downlink import params_sha256
from fedmq.transport import open_link
from fedmq.transport.flows import clear_blob
from fedmq.transport.memory import get_bus
from fedmq.transport.sender import BlobSender
from tests.coordinator.downlink_fleet import coordinator_config, device_threads, hashes_match, run_recording


@pytest.fixture(params=["memory", "mosquitto"])
def transport(request, tmp_path):
    """(url, protocol) of a fresh bus or a fresh mosquitto."""
    if request.param == "memory":
        return f"memory://dl-{secrets.token_hex(4)}", "5"
    broker = request.getfixturevalue("mosquitto")
    return broker.url, broker.protocol


def read_chain(url: str, protocol: str, fed: str) -> ModelChain:
    from fedmq.transport.flows import _retained  # the one helper that reads a retained message
    from fedmq.transport.settings import BrokerSettings
    with open_link(BrokerSettings(url=url, protocol=protocol), client_id=f"chk-{secrets.token_hex(3)}") as link:
        body = _retained(link, topics.model_chain(fed), 10.0)
    assert body is not None, "no retained version chain"
    return ModelChain.from_bytes(body)


def wait_for(predicate, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_devices_selected_every_few_rounds_and_a_follower_hold_the_published_models(transport, tmp_path):
    url, protocol = transport
    fed = "dl-partial"
    fleet = device_threads(tmp_path, url, protocol, fed, 4)
    for i in range(3):
        fleet.start(i)
    follower = fleet.start(3, model_follow=True)
    try:
        cfg = coordinator_config(url, protocol, tmp_path / "coord", fed, rounds=6, per_round=2, min_devices=4)
        result, published = run_recording(cfg)
        # The follower fetches every version as it is published, selected or not.
        wait_for(lambda: follower.sync.held is not None and follower.sync.held[0] == result.version, 30,
                 "the follower")
        assert params_sha256(follower.sync.held[1]) == published[result.version]
    finally:
        fleet.stop_all()
    assert [r.state for r in result.records] == ["closed"] * 6
    assert hashes_match(fleet.agents, published) == []
    assert sum(len(a.trained_from) for a in fleet.agents.values()) >= 6 * 2 - 1
    # Devices that skipped versions caught up through deltas.
    assert sum(a.counters["deltas_applied"] for a in fleet.agents.values()) > 6
    assert all(a.counters["downlink_fallbacks"] == 0 for a in fleet.agents.values())
    chain = read_chain(url, protocol, fed)
    assert chain.latest == result.version == 6 and chain.latest_sha256 == published[6]
    assert [e.version for e in chain.deltas] == [3, 4, 5, 6]  # window 4: older deltas cleared
    # Bytes down per round are what the devices' links counted; on the bus they match its own count.
    assert all(r.bytes_down > 0 for r in result.records)
    if url.startswith("memory://"):
        bus = get_bus(url.removeprefix("memory://"))
        for name, agent in fleet.agents.items():
            assert agent.link.traffic.bytes_in == bus.stats[(name, "bytes_out")], name
            assert agent.link.traffic.bytes_out == bus.stats[(name, "bytes_in")], name
        delivered = sum(bus.stats[(name, "bytes_out")] for name in fleet.agents)
        assert sum(r.bytes_down for r in result.records) <= delivered
        retained = bus.retained()
        assert not any(t.startswith(topics.model_delta(fed, 2) + "/") for t in retained)
        assert any(t.startswith(topics.model_delta(fed, 3) + "/") for t in retained)


def test_offline_longer_than_the_window_takes_the_snapshot(transport, tmp_path, caplog):
    url, protocol = transport
    fed = "dl-offline"
    fleet = device_threads(tmp_path, url, protocol, fed, 4)
    state = tmp_path / "coord"
    for i in range(4):
        fleet.start(i)
    try:
        _, published = run_recording(coordinator_config(url, protocol, state, fed, rounds=2, per_round=4, min_devices=4))
        fleet.stop("dev3")  # holds version 1 (what it trained round 2 from)
        _, more = run_recording(coordinator_config(url, protocol, state, fed, rounds=8, per_round=3, min_devices=3))
        published.update(more)
        with caplog.at_level(logging.INFO, logger="edge_client.agent"):
            back = fleet.start(3)
            result, last = run_recording(coordinator_config(url, protocol, state, fed, rounds=9, per_round=4,
                                                            min_devices=4))
    finally:
        fleet.stop_all()
    published.update(last)
    assert result.version == 9 and back.trained_from[9][0] == 8
    assert back.trained_from[9][1] == published[8]
    assert hashes_match(fleet.agents, published) == []
    assert "snapshot 8: a delta between version 1 and 8 is not retained" in caplog.text


def test_missing_or_corrupt_delta_falls_back_to_the_snapshot_and_says_why(transport, tmp_path, caplog):
    url, protocol = transport
    fed = "dl-broken"
    fleet = device_threads(tmp_path, url, protocol, fed, 5)
    state = tmp_path / "coord"
    opts = {"downlink": {"snapshot_every": 2, "window": 4}}
    for i in range(5):
        fleet.start(i)
    try:
        _, published = run_recording(coordinator_config(url, protocol, state, fed, rounds=1, per_round=5,
                                                        min_devices=5, **opts))
        fleet.stop("dev3")  # holds version 0, what it trained round 1 from
        published.update(run_recording(coordinator_config(url, protocol, state, fed, rounds=3, per_round=4,
                                                           min_devices=4, **opts))[1])
        fleet.stop("dev4")  # holds version 2
        published.update(run_recording(coordinator_config(url, protocol, state, fed, rounds=4, per_round=3,
                                                           min_devices=3, **opts))[1])  # dev0-2 hold version 3
        coord = Coordinator(coordinator_config(url, protocol, state, fed, rounds=5, per_round=5, min_devices=5, **opts))
        tampered = []

        def on(p: Progress) -> None:
            # Once the restarted coordinator has republished the chain and waits for devices:
            # clear delta 3 (missing for dev4) and replace delta 4 by other bytes (corrupt for
            # dev0-2), then let dev3 and dev4 back in.
            if p.kind == "waiting" and not tampered:
                tampered.append(True)
                with open_link(coord.config.broker, client_id="tamper") as link:
                    clear_blob(link, topics.model_delta(fed, 3))
                    good = DeltaBlob.from_bytes((state / "downlink" / "delta-4.bin").read_bytes())
                    forged = DeltaBlob(good.codec, good.spec_hash, 3, 4, good.base_sha256, good.sha256,
                                       (state / "downlink" / "delta-2.bin").read_bytes()[-len(good.payload):])
                    BlobSender(link).send(topics.model_delta(fed, 4), forged.to_bytes(), retain=True, timeout=10)
                fleet.start(3)
                fleet.start(4)
            if p.kind == "round_closed" and p.record is not None:
                published[p.record.model_version] = coord.publisher.published_sha

        with caplog.at_level(logging.INFO, logger="edge_client.agent"):
            result = coord.run(on)
    finally:
        fleet.stop_all()
    assert result.version == 5 and tampered
    for agent in fleet.agents.values():
        assert agent.trained_from[5] == (4, published[4]), agent.cfg.device_id
    assert [fleet.agents[f"dev{i}"].counters["downlink_fallbacks"] for i in range(5)] == [1, 1, 1, 0, 1]
    assert hashes_match(fleet.agents, published) == []
    text = caplog.text
    assert "delta path to version 4 failed (blob 'fedmq/dl-broken/model/delta/3' not complete within" in text
    assert "delta path to version 4 failed (delta 4: blob sha256" in text and "differs from the chain's" in text
    # dev3 (version 0) needs four deltas: the snapshot is cheaper.
    assert "snapshot 4: deltas from version 0" in text and "cost more than the snapshot path" in text


def _toml(url: str, protocol: str, state: Path, fed: str, rounds: int) -> str:
    return f"""
federation = "{fed}"
task = "digits-logreg"
rounds = {rounds}
seed = 3
state_dir = "{state}"
[broker]
url = "{url}"
protocol = "{protocol}"
[round]
devices_per_round = 3
min_updates = 3
over_selection = 1.0
deadline_s = 20.0
min_devices = 3
[plan]
density = 0.1
lr = 0.1
[publish]
onnx = false
[downlink]
density = 0.05
window = 10
snapshot_every = 10
"""


def test_kill_minus_9_between_compressing_and_publishing_then_every_device_converges(mosquitto, tmp_path,
                                                                                     coordinator_cli,
                                                                                     monkeypatch):
    fed = "dl-kill"
    state = tmp_path / "coord"
    cfg_path = tmp_path / "coord.toml"
    cfg_path.write_text(_toml(mosquitto.url, mosquitto.protocol, state, fed, 4))
    pause_file = tmp_path / "paused"
    fleet = device_threads(tmp_path, mosquitto.url, mosquitto.protocol, fed, 3)
    for i in range(3):
        fleet.start(i)
    try:
        monkeypatch.setenv("FEDMQ_COORDINATOR_TEST_PAUSE_AT", "publishing")
        monkeypatch.setenv("FEDMQ_COORDINATOR_TEST_PAUSE_FILE", str(pause_file))
        proc = coordinator_cli(cfg_path)
        wait_for(pause_file.exists, 120, "the coordinator to pause before publishing version 1")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        # Version 1 is compressed and checkpointed, but not on the broker.
        assert load_checkpoint(state).version == 1
        assert read_chain(mosquitto.url, mosquitto.protocol, fed).latest == 0
        monkeypatch.delenv("FEDMQ_COORDINATOR_TEST_PAUSE_AT")
        proc = coordinator_cli(cfg_path)
        out, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, out
    finally:
        fleet.stop_all()
    final = load_checkpoint(state)
    chain = read_chain(mosquitto.url, mosquitto.protocol, fed)
    assert final.version == chain.latest == 4 and chain.latest_sha256 == params_sha256(final.model)
    hashes = {e.version: e.sha256 for e in chain.deltas} | {0: chain.origin_sha256}
    assert sorted(hashes) == [0, 1, 2, 3, 4]
    for name, agent in fleet.agents.items():
        assert sorted(agent.trained_from) == [1, 2, 3, 4], name
        for round_, (version, sha) in agent.trained_from.items():
            assert sha == hashes[version], (name, round_, version)
