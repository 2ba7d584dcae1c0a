"""Chunked blob transfers through real brokers (mosquitto and the embedded amqtt broker).

Every wait is bounded; faults are injected by a test link that corrupts, drops or holds
back chunks on the sending side, never by mocking the broker.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
import time
from pathlib import Path

import pytest

from fedmq.wire import topics
from fedmq.errors import TransportError
from fedmq.wire.messages import ModelPointer, Receipt
from fedmq.transport import (BlobReceiver, BlobSender, BrokerSettings, CompletedBlob, MqttLink, TransferRequest,
                             clear_blob, fetch_blob, fetch_model, publish_model, request_repairs)
from fedmq.transport.link import Publish

FED = "fed1"
WAIT = 60.0


def settings_for(broker, **kw) -> BrokerSettings:
    return BrokerSettings(url=broker.url, protocol=broker.protocol, reconnect_min=0.2, reconnect_max=1.0, **kw)


def pointer_for(data: bytes, version: int) -> ModelPointer:
    return ModelPointer(version=version, spec_hash="abc", round=version, size=len(data),
                        sha256=hashlib.sha256(data).hexdigest())


class FaultyLink(MqttLink):
    """A device link whose chunk publishes can be corrupted, dropped or held back once."""

    def __init__(self, *args, corrupt=(), drop=(), hold: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.corrupt = set(corrupt)
        self.drop = set(drop)
        self.hold = hold
        self.gate = threading.Event()
        self.dead = False

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> Publish:
        if self.dead:
            raise TransportError("this device is dead")
        index = int(topic.rsplit("/c/", 1)[1]) if "/c/" in topic else None
        if index is not None and index == self.hold:
            assert self.gate.wait(WAIT), "test never released the held chunk"
            self.hold = None
        if index in self.corrupt:
            self.corrupt.discard(index)
            payload = payload[:-1] + bytes([payload[-1] ^ 0xFF])
        if index in self.drop:
            self.drop.discard(index)
            topic = "void/" + topic  # acknowledged by the broker, seen by nobody
        return super().publish(topic, payload, qos=qos, retain=retain)


class Coordinator(threading.Thread):
    """Drains its link's inbox into a BlobReceiver and asks for repairs of stalled transfers."""

    def __init__(self, link: MqttLink, receiver: BlobReceiver, repair_idle: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.link, self.receiver, self.repair_idle = link, receiver, repair_idle
        self.blobs: list[CompletedBlob] = []
        self.cond = threading.Condition()
        self.stop = threading.Event()
        self.repairs = 0

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                msg = self.link.inbox.get(timeout=0.1)
            except queue.Empty:
                msg = None
            if msg is not None:
                blob = self.receiver.feed(msg.topic, msg.payload)
                with self.cond:
                    if blob is not None:
                        self.blobs.append(blob)
                    self.cond.notify_all()
            self.repairs += request_repairs(self.link, FED, self.receiver, idle=self.repair_idle)

    def wait_for(self, predicate, timeout: float = WAIT) -> bool:
        with self.cond:
            return self.cond.wait_for(predicate, timeout)

    def chunks_of(self, base: str) -> int:
        missing = self.receiver.missing(base)
        manifest = self.receiver.manifest(base)
        return 0 if missing is None or manifest is None else manifest.count - len(missing)


class Device(threading.Thread):
    """Answers TransferRequests for its update transfers."""

    def __init__(self, link: MqttLink, sender: BlobSender) -> None:
        super().__init__(daemon=True)
        self.link, self.sender = link, sender
        self.stop = threading.Event()
        self.answered = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                msg = self.link.inbox.get(timeout=0.1)
            except queue.Empty:
                continue
            assert msg.topic == topics.transfer_requests(FED, self.link.client_id), msg.topic
            if self.sender.handle_request(msg.payload, timeout=WAIT):
                self.answered.set()


def start_coordinator(broker, tmp_path: Path, **settings_kw) -> Coordinator:
    link = MqttLink(settings_for(broker, **settings_kw), "coordinator").connect()
    link.subscribe(topics.update_filter(FED))
    coord = Coordinator(link, BlobReceiver(tmp_path / "coord-spool", spool_threshold=512 * 1024, timeout=WAIT))
    coord.start()
    return coord


def start_device(broker, name: str, link_cls=MqttLink, **link_kw) -> Device:
    link = link_cls(settings_for(broker), name, **link_kw).connect()
    link.subscribe(topics.transfer_requests(FED, name))
    device = Device(link, BlobSender(link, chunk_size=64 * 1024))
    device.start()
    return device


def shutdown(*parts) -> None:
    for part in parts:
        part.stop.set()
    for part in parts:
        part.join(5)
        part.link.close()


@pytest.fixture
def small_packet_mosquitto(mosquitto_factory):
    return mosquitto_factory(extra_conf="max_packet_size 65536")


@pytest.fixture(params=["mosquitto", "embedded"])
def any_broker(request):
    if request.param == "mosquitto":
        return request.getfixturevalue("small_packet_mosquitto")
    return request.getfixturevalue("embedded_broker")


def test_model_reaches_three_devices_and_update_reaches_coordinator(any_broker, tmp_path):
    model = os.urandom(5 * 1024 * 1024)
    coord = start_coordinator(any_broker, tmp_path)
    info = publish_model(coord.link, FED, 1, model, pointer_for(model, 1))
    if any_broker.protocol == "5":  # mosquitto with max_packet_size 65536
        assert coord.link.broker_max_packet == 65536
        assert info.chunk_size < 65536 and info.count > 80
    results: dict[str, bytes] = {}

    def download(name: str) -> None:
        link = MqttLink(settings_for(any_broker), name).connect()
        try:
            pointer, blob = fetch_model(link, FED, receiver=BlobReceiver(tmp_path / name, spool_threshold=1 << 20),
                                        timeout=WAIT)
            assert pointer.version == 1
            results[name] = blob.data
        finally:
            link.close()

    threads = [threading.Thread(target=download, args=(f"dev{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT + 10)
    assert sorted(results) == ["dev0", "dev1", "dev2"]
    assert all(data == model for data in results.values())

    update = os.urandom(1024 * 1024)
    device = start_device(any_broker, "dev9")
    base = topics.update_base(FED, "dev9", "t1")
    sent = device.sender.send(base, update, timeout=WAIT)
    assert sent.count > 1
    assert coord.wait_for(lambda: len(coord.blobs) == 1)
    assert coord.blobs[0].base == base and coord.blobs[0].data == update
    assert coord.link.disconnects == 0 and device.link.disconnects == 0  # no oversized packet ever sent
    shutdown(coord, device)


def test_corrupt_and_missing_chunks_of_an_update_are_repaired(any_broker, tmp_path):
    coord = start_coordinator(any_broker, tmp_path)
    device = start_device(any_broker, "dev1", link_cls=FaultyLink, corrupt={2}, drop={5})
    update = os.urandom(600 * 1024)
    base = topics.update_base(FED, "dev1", "t7")
    device.sender.send(base, update, timeout=WAIT)
    assert coord.wait_for(lambda: len(coord.blobs) == 1)
    assert coord.blobs[0].data == update
    assert coord.receiver.stats["corrupt_chunks"] >= 1
    assert coord.repairs >= 1 and device.answered.wait(WAIT)
    assert coord.receiver.stats["hash_mismatch"] == 0
    shutdown(coord, device)


def test_corrupt_retained_chunk_is_fetched_again(any_broker, tmp_path):
    model = os.urandom(700 * 1024)
    link = MqttLink(settings_for(any_broker), "coordinator").connect()
    base = topics.model_blob(FED, 3)
    info = BlobSender(link, chunk_size=64 * 1024).send(base, model, retain=True, timeout=WAIT)
    # A device got the manifest and a chunk damaged in transit, and one chunk never came.
    receiver = BlobReceiver(timeout=WAIT)
    manifest_body = _retained_copy(link, topics.blob_manifest(base))
    good = _retained_copy(link, topics.blob_chunk(base, 4))
    assert receiver.feed(topics.blob_manifest(base), manifest_body) is None
    assert receiver.feed(topics.blob_chunk(base, 4), good[:-1] + bytes([good[-1] ^ 1])) is None
    assert receiver.stats["corrupt_chunks"] == 1 and 4 in receiver.missing(base)
    blob = fetch_blob(link, base, timeout=WAIT, receiver=receiver)
    assert blob.data == model and blob.transfer_id == info.transfer_id
    # Clearing the superseded version leaves nothing retained under its base.
    assert clear_blob(link, base) == info.count
    assert _retained_copy(link, topics.blob_manifest(base), timeout=0.5) is None
    assert _retained_copy(link, topics.blob_chunk(base, 0), timeout=0.5) is None
    link.close()


def _retained_copy(link: MqttLink, topic: str, timeout: float = 10.0) -> bytes | None:
    inbox = queue.SimpleQueue()
    link.subscribe(topic, inbox=inbox)
    try:
        msg = inbox.get(timeout=timeout)
        return msg.payload or None
    except queue.Empty:
        return None
    finally:
        link.unsubscribe(topic)
        link.unroute(topic)


def test_sender_dying_half_way_is_dropped_then_retried(any_broker, tmp_path):
    coord_link = MqttLink(settings_for(any_broker), "coordinator").connect()
    coord_link.subscribe(topics.update_filter(FED))
    clock = [1000.0]
    receiver = BlobReceiver(tmp_path / "spool", spool_threshold=256 * 1024, timeout=30.0, clock=lambda: clock[0])
    update = os.urandom(800 * 1024)
    base = topics.update_base(FED, "dev2", "t1")

    dying = FaultyLink(settings_for(any_broker), "dev2", hold=6).connect()
    sender = BlobSender(dying, chunk_size=64 * 1024, window=1)
    worker = threading.Thread(target=lambda: _swallow(sender.send, base, update, timeout=5.0), daemon=True)
    worker.start()

    def drain_until(predicate, timeout=WAIT):
        deadline = time.monotonic() + timeout
        while not predicate():
            msg = coord_link.inbox.get(timeout=max(0.01, deadline - time.monotonic()))
            assert receiver.feed(msg.topic, msg.payload) is None, "a partial transfer was delivered"

    drain_until(lambda: receiver.manifest(base) is not None
                and len(receiver.missing(base)) == receiver.manifest(base).count - 6)
    dying.dead = True  # the device dies: no more packets, no clean disconnect
    dying._client.loop_stop()
    dying._client.socket().close()
    assert receiver.pending() == [base]
    clock[0] += 31.0
    assert receiver.expire() == [base]
    assert receiver.pending() == [] and receiver.stats["expired"] == 1
    assert list((tmp_path / "spool").iterdir()) == []

    retry = MqttLink(settings_for(any_broker), "dev2b").connect()
    BlobSender(retry, chunk_size=64 * 1024).send(base, update, timeout=WAIT)
    done: list[CompletedBlob] = []
    deadline = time.monotonic() + WAIT
    while not done:
        msg = coord_link.inbox.get(timeout=max(0.01, deadline - time.monotonic()))
        blob = receiver.feed(msg.topic, msg.payload)
        if blob is not None:
            done.append(blob)
    assert done[0].data == update and receiver.stats["hash_mismatch"] == 0
    dying.gate.set()
    worker.join(10)
    retry.close()
    coord_link.close()


def _swallow(fn, *args, **kwargs) -> None:
    try:
        fn(*args, **kwargs)
    except Exception:  # the dying sender's send() fails once its link is gone: expected
        pass


def test_device_restart_gets_queued_messages_and_downloads_only_what_it_lacks(small_packet_mosquitto, tmp_path):
    broker = small_packet_mosquitto
    device_settings = settings_for(broker, session_expiry=600)
    coordinator = MqttLink(settings_for(broker), "coordinator").connect()
    model = os.urandom(2 * 1024 * 1024)
    publish_model(coordinator, FED, 5, model, pointer_for(model, 5))
    base = topics.model_blob(FED, 5)

    device = MqttLink(device_settings, "dev3").connect()
    device.subscribe(topics.receipt(FED, "dev3"))
    # The device downloads the first half of the model into its spool, then stops.
    spool = tmp_path / "dev3-spool"
    receiver = BlobReceiver(spool, spool_threshold=256 * 1024, timeout=600)
    manifest = _retained_copy(device, topics.blob_manifest(base))
    receiver.feed(topics.blob_manifest(base), manifest)
    count = receiver.manifest(base).count
    for i in range(count // 2):
        assert receiver.feed(topics.blob_chunk(base, i), _retained_copy(device, topics.blob_chunk(base, i))) is None
    receiver.close()
    device.close()

    receipts = [Receipt(device="dev3", round=r, transfer_id=f"t{r}", status="accepted") for r in range(3)]
    for receipt in receipts:
        coordinator.publish_wait(topics.receipt(FED, "dev3"), receipt.to_bytes())

    device = MqttLink(device_settings, "dev3").connect()
    assert device.session_present
    got = [Receipt.from_bytes(device.inbox.get(timeout=WAIT).payload) for _ in receipts]
    assert got == receipts

    resumed = BlobReceiver(spool, spool_threshold=256 * 1024, timeout=600)
    assert resumed.stats["resumed_chunks"] == count // 2
    blob = fetch_blob(device, base, timeout=WAIT, receiver=resumed)
    assert blob.data == model
    assert resumed.stats["chunks"] - resumed.stats["duplicate_chunks"] == count - count // 2
    device.close()
    coordinator.close()


def test_broker_restart_in_the_middle_of_an_update(any_broker, tmp_path):
    coord = start_coordinator(any_broker, tmp_path, session_expiry=600 if any_broker.protocol == "5" else 0)
    device = start_device(any_broker, "dev4", link_cls=FaultyLink, hold=8)
    update = os.urandom(1024 * 1024)
    base = topics.update_base(FED, "dev4", "t1")
    result: list[object] = []
    worker = threading.Thread(target=lambda: result.append(device.sender.send(base, update, timeout=WAIT)),
                              daemon=True)
    worker.start()
    assert coord.wait_for(lambda: coord.chunks_of(base) >= 8)
    any_broker.restart()
    device.link.gate.set()
    assert coord.wait_for(lambda: len(coord.blobs) == 1, timeout=WAIT)
    assert coord.blobs[0].data == update
    worker.join(WAIT)
    assert result, "the sender did not finish"
    assert coord.link.connects >= 2 and device.link.connects >= 2
    shutdown(coord, device)


def test_broker_restart_in_the_middle_of_a_model_publication(small_packet_mosquitto, tmp_path):
    broker = small_packet_mosquitto
    model = os.urandom(1024 * 1024)
    coordinator = FaultyLink(settings_for(broker), "coordinator", hold=6).connect()
    device = MqttLink(settings_for(broker, session_expiry=600), "dev5").connect()
    base = topics.model_blob(FED, 9)
    receiver = BlobReceiver(tmp_path / "spool", spool_threshold=128 * 1024, timeout=WAIT)
    worker = threading.Thread(
        target=lambda: publish_model(coordinator, FED, 9, model, pointer_for(model, 9), chunk_size=64 * 1024,
                                     timeout=WAIT), daemon=True)
    worker.start()
    fetched: list[CompletedBlob] = []
    fetcher = threading.Thread(target=lambda: fetched.append(fetch_blob(device, base, WAIT, receiver=receiver)),
                               daemon=True)
    fetcher.start()
    deadline = time.monotonic() + WAIT
    while (receiver.manifest(base) is None or len(receiver.missing(base) or ()) > receiver.manifest(base).count - 6):
        assert time.monotonic() < deadline, "device never got the first chunks"
        fetcher.join(0.05)
    broker.restart()
    coordinator.gate.set()
    fetcher.join(WAIT)
    worker.join(WAIT)
    assert fetched and fetched[0].data == model
    assert device.connects >= 2 and coordinator.connects >= 2
    device.close()
    coordinator.close()


def test_transfer_request_round_trip():
    request = TransferRequest("fedmq/f/update/d/t", b"\x01" * 16, (3, 5))
    assert TransferRequest.from_bytes(request.to_bytes()) == request
