"""Admission before allocation, against the real coordinator on a real mosquitto: a manifest is
judged (device known, selected for an open round, size within the bound, assembly limits) before
the coordinator allocates anything for its transfer; retained client updates are cleared."""

from __future__ import annotations

import queue
import threading
from pathlib import Path

import pytest

from coordinator.config import config_from_dict
from coordinator.service import Coordinator
from fedmq.wire import topics
from fedmq.wire.messages import Receipt, Status
from fedmq.model.params import ParamSpec
from fedmq.tasks import get_task
from fedmq.transport.link import MqttLink
from fedmq.transport.settings import BrokerSettings
from fedmq.transport.wire import Manifest
from tests.waiting import until

pytestmark = [pytest.mark.security, pytest.mark.timeout(120)]

FED = "adm"
TASK = "digits-mlp"
WAIT = 30.0


def _until(predicate, timeout: float = WAIT) -> bool:
    return bool(until(predicate, timeout))


def _manifest(size: int) -> bytes:
    # Announces ``size`` bytes in 256 KiB chunks; no chunk ever follows.
    m = Manifest.build(b"\x07" * 16, b"\x00" * size, 256 * 1024, inline=False)
    return m.to_bytes()


@pytest.fixture
def running(mosquitto, tmp_path: Path):
    """A coordinator (thread) that selects one device per round; a client speaking for dev-a
    and dev-b; its receipts queue."""
    spec = ParamSpec.from_module(get_task(TASK).build_model(0))
    cfg = config_from_dict({
        "federation": FED, "task": TASK, "rounds": 1, "state_dir": str(tmp_path / "state"),
        "broker": {"url": mosquitto.url, "protocol": mosquitto.protocol},
        "round": {"devices_per_round": 1, "min_devices": 1, "over_selection": 1.0, "deadline_s": 60.0},
        "evaluation": {"data": "none"}, "publish": {"onnx": False},
        "limits": {"max_transfers_per_device": 2}})
    coord = Coordinator(cfg)
    peer = MqttLink(BrokerSettings(url=mosquitto.url, protocol=mosquitto.protocol), client_id="peer").connect()
    receipts: queue.SimpleQueue = queue.SimpleQueue()
    peer.subscribe([topics.receipt(FED, "dev-a"), topics.receipt(FED, "dev-b")], inbox=receipts)
    thread = threading.Thread(target=coord.run, daemon=True)
    thread.start()
    # The first model is published once the coordinator has subscribed: publishes from here on reach it.
    assert _until(lambda: coord.publisher.model_at is not None)
    try:
        yield coord, peer, receipts, spec
    finally:
        coord.stop()
        thread.join(30)
        peer.close()


def _receipt(receipts: queue.SimpleQueue) -> Receipt:
    return Receipt.from_bytes(receipts.get(timeout=WAIT).payload)


def test_manifests_are_judged_before_anything_is_allocated(running) -> None:
    coord, peer, receipts, spec = running
    big = 512 << 10
    # An unknown device: dropped, nothing allocated or answered.
    peer.publish_wait(topics.blob_manifest(topics.update_base(FED, "ghost", "t1")), _manifest(big))
    status = Status("dev-b", True, TASK, "0" * 16, 10)  # wrong spec: known, never eligible
    peer.publish_wait(topics.status(FED, "dev-b"), status.to_bytes(), retain=True)
    # dev-a becomes eligible and is selected for round 1.
    peer.publish_wait(topics.status(FED, "dev-a"), Status("dev-a", True, TASK, spec.hash, 10).to_bytes(),
                      retain=True)
    assert _until(lambda: coord.engine.is_open and "dev-a" in coord.engine.selected)
    assert coord.receiver.pending_bytes() == (0, 0)
    # A known device the round did not select: refused from its manifest.
    peer.publish_wait(topics.blob_manifest(topics.update_base(FED, "dev-b", "t2")), _manifest(big))
    r = _receipt(receipts)
    assert (r.device, r.status, r.reason) == ("dev-b", "rejected", "unselected")
    # Two transfers in assembly are allowed, the third is refused as busy (not an answer:
    # the device may still send its update).
    for t in ("t4", "t5", "t6"):
        peer.publish_wait(topics.blob_manifest(topics.update_base(FED, "dev-a", t)), _manifest(256 << 10))
    r = _receipt(receipts)
    assert (r.transfer_id, r.status, r.reason) == ("t6", "rejected", "busy")
    assert coord.receiver.pending_bytes() == (2, 512 << 10), "only the two admitted transfers hold memory"
    assert coord.engine.is_open
    limit = coord.update_limit
    peer.publish_wait(topics.blob_manifest(topics.update_base(FED, "dev-a", "t3")), _manifest(limit + 1))
    r = _receipt(receipts)
    assert (r.transfer_id, r.status, r.reason) == ("t3", "rejected", "oversized")
    assert coord.receiver.pending_bytes() == (2, 512 << 10)
    assert coord.engine.rejected.get("oversized") == 1 and coord.engine.rejected.get("busy") == 1


def test_a_retained_client_update_is_ignored_and_cleared(running, mosquitto) -> None:
    coord, peer, receipts, spec = running
    peer.publish_wait(topics.status(FED, "dev-a"), Status("dev-a", True, TASK, spec.hash, 10).to_bytes(),
                      retain=True)
    topic = topics.blob_manifest(topics.update_base(FED, "dev-a", "t9"))
    watch: queue.SimpleQueue = queue.SimpleQueue()
    watcher = MqttLink(BrokerSettings(url=mosquitto.url, protocol=mosquitto.protocol), client_id="watch").connect()
    try:
        watcher.subscribe(topic, inbox=watch)
        peer.publish_wait(topic, _manifest(100_000), retain=True)
        r = _receipt(receipts)
        assert (r.transfer_id, r.status, r.reason) == ("t9", "rejected", "retained")
        payloads = []
        assert _until(lambda: (payloads.append(watch.get_nowait().payload) if not watch.empty() else None) or
                      b"" in payloads), "the coordinator clears the retained message"
        assert coord.receiver.pending_bytes() == (0, 0)
    finally:
        watcher.close()
