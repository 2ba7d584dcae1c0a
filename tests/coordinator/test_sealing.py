"""Sealed client updates end to end: what a broker operator sees on the wire (a wildcard
subscriber on a real mosquitto), the coordinator's refusals (``unsealed``, ``bad_seal``), and
the in-memory bus."""

from __future__ import annotations

import queue
import threading
from pathlib import Path

import numpy as np
import pytest

from coordinator.config import config_from_dict
from coordinator.service import Coordinator
from fedmq.wire import topics
from fedmq.wire.envelope import ClientUpdate, decode_update, encode_update
from fedmq.errors import WireError
from fedmq.wire.messages import Receipt, Status
from fedmq.model.params import ParamSpec
from fedmq.security.sealing import is_sealed, load_or_create_key, seal_update
from fedmq.tasks import get_task
from fedmq.transport.link import MqttLink
from fedmq.transport.receiver import BlobReceiver
from fedmq.transport.sender import BlobSender
from fedmq.transport.settings import BrokerSettings
from fleet.demo import DemoSettings, run_demo
from tests.waiting import until

pytestmark = [pytest.mark.security, pytest.mark.timeout(180)]

TASK = "digits-mlp"
WAIT = 30.0


def _until(predicate, timeout: float = WAIT) -> bool:
    return bool(until(predicate, timeout))


def _drain(inbox: queue.SimpleQueue) -> list:
    out = []
    while not inbox.empty():
        out.append(inbox.get_nowait())
    return out


def test_broker_operator_sees_no_plaintext_update(mosquitto, tmp_path: Path) -> None:
    fed = "demo"
    operator = MqttLink(BrokerSettings(url=mosquitto.url, protocol=mosquitto.protocol), client_id="operator").connect()
    wire: queue.SimpleQueue = queue.SimpleQueue()
    operator.subscribe(["#"], inbox=wire)
    try:
        summary = run_demo(DemoSettings(
            devices=3, per_round=3, rounds=2, task=TASK, data="digits", broker=mosquitto.url,
            protocol=mosquitto.protocol, out=tmp_path / "demo", devices_in="threads", write_files=False,
            publish_onnx=False, samples_per_device=60, test_samples=100))
    finally:
        operator.close()
    assert summary["sealed"] and summary["updates_accepted"] == 6 and summary["updates_rejected"] == 0

    spec = ParamSpec.from_module(get_task(TASK).build_model(0))
    messages = [m for m in _drain(wire) if topics.parse_update_topic(fed, m.topic) is not None]
    receiver = BlobReceiver(timeout=600.0)
    blobs = [b.data for b in (receiver.feed(m.topic, m.payload) for m in messages) if b is not None]
    assert len(blobs) >= 6
    for payload in [m.payload for m in messages] + blobs:
        with pytest.raises(WireError):
            decode_update(payload, spec)
    assert all(is_sealed(b) for b in blobs)
    # Each device's last update as it made it (kept in its state folder): a stretch of its
    # codec payload appears nowhere on the wire, though the plain envelope carries it whole.
    for device_dir in sorted((tmp_path / "demo" / "devices").iterdir()):
        (plain_file,) = (device_dir / "state").glob("update-*.bin")
        plain = plain_file.read_bytes()
        payload = decode_update(plain, spec).payload
        pattern = payload[len(payload) // 2:len(payload) // 2 + 24]
        assert pattern in plain
        assert not any(pattern in m.payload for m in messages), device_dir.name
        assert not any(pattern in b for b in blobs), device_dir.name


@pytest.fixture
def strict(mosquitto, tmp_path: Path):
    """A coordinator requiring sealed updates, selecting dev-a and dev-b in round 1; a peer
    speaking for both, and their receipts."""
    fed = "strict"
    spec = ParamSpec.from_module(get_task(TASK).build_model(0))
    cfg = config_from_dict({
        "federation": fed, "task": TASK, "rounds": 1, "state_dir": str(tmp_path / "state"),
        "broker": {"url": mosquitto.url, "protocol": mosquitto.protocol},
        "round": {"devices_per_round": 2, "min_devices": 2, "over_selection": 1.0, "deadline_s": 60.0},
        "evaluation": {"data": "none"}, "publish": {"onnx": False}, "sealing": {"required": True}})
    coord = Coordinator(cfg)
    peer = MqttLink(BrokerSettings(url=mosquitto.url, protocol=mosquitto.protocol), client_id="peer").connect()
    receipts: queue.SimpleQueue = queue.SimpleQueue()
    peer.subscribe([topics.receipt(fed, "dev-a"), topics.receipt(fed, "dev-b")], inbox=receipts)
    thread = threading.Thread(target=coord.run, daemon=True)
    thread.start()
    assert _until(lambda: coord.publisher.model_at is not None)  # subscribed
    for dev in ("dev-a", "dev-b"):
        peer.publish_wait(topics.status(fed, dev), Status(dev, True, TASK, spec.hash, 10).to_bytes(), retain=True)
    assert _until(lambda: coord.engine.is_open and set(coord.engine.selected) == {"dev-a", "dev-b"})
    try:
        yield fed, coord, peer, receipts, spec
    finally:
        coord.stop()
        thread.join(30)
        peer.close()


def _envelope(fed: str, device: str, spec: ParamSpec) -> bytes:
    vec = np.full(spec.size, 0.01, dtype=np.float32)
    return encode_update(ClientUpdate(federation=fed, device=device, round=1, base_version=0, samples=10,
                                      kind="delta", spec_hash=spec.hash, codec="none", payload=vec.tobytes()))


def test_required_sealing_refuses_plain_and_foreign_sealed_updates(strict, tmp_path: Path) -> None:
    fed, coord, peer, receipts, spec = strict
    sender = BlobSender(peer)
    # A plain envelope: refused as unsealed, counted.
    sender.send(topics.update_base(fed, "dev-a", "t1"), _envelope(fed, "dev-a", spec), timeout=WAIT)
    r = Receipt.from_bytes(receipts.get(timeout=WAIT).payload)
    assert (r.device, r.transfer_id, r.status, r.reason) == ("dev-a", "t1", "rejected", "unsealed")
    # Sealed to another coordinator's key (a device provisioned for someone else): bad_seal.
    foreign = load_or_create_key(tmp_path / "elsewhere")
    sealed = seal_update(_envelope(fed, "dev-b", spec), foreign.public, federation=fed, device="dev-b",
                         transfer_id="t2")
    sender.send(topics.update_base(fed, "dev-b", "t2"), sealed, timeout=WAIT)
    r = Receipt.from_bytes(receipts.get(timeout=WAIT).payload)
    assert (r.device, r.transfer_id, r.status, r.reason) == ("dev-b", "t2", "rejected", "bad_seal")
    assert coord.engine.rejected == {"unsealed": 1, "bad_seal": 1} and coord.engine.aggregate.count == 0


def test_the_in_memory_bus_carries_sealed_updates_to_the_same_model(tmp_path: Path) -> None:
    runs = {}
    for seal in (True, False):
        runs[seal] = run_demo(DemoSettings(
            devices=3, per_round=3, rounds=2, task=TASK, data="digits", broker="memory", devices_in="threads",
            out=tmp_path / str(seal), write_files=False, publish_onnx=False, samples_per_device=60, test_samples=100,
            seal=seal))
    assert runs[True]["sealed"] and not runs[False]["sealed"]
    assert runs[True]["updates_accepted"] == runs[False]["updates_accepted"] == 6
    # Sealing changes how an update travels, not what is aggregated.
    assert runs[True]["accuracy_per_round"] == runs[False]["accuracy_per_round"]
    assert runs[True]["bytes_up_total"] > runs[False]["bytes_up_total"]
