"""Denial-of-service budget: a device that floods its own update topics (10,000 publishes as fast
as the broker takes them, bogus manifests and chunks) affects only itself; the coordinator's
rounds close with the other devices' updates, nothing is held for the junk, and every refusal is
counted."""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import pytest

from coordinator.service import Coordinator
from fedmq.wire import topics
from fedmq.wire.messages import Status
from fedmq.model.params import ParamSpec
from fedmq.tasks import get_task
from fedmq.transport.link import MqttLink
from fedmq.transport.settings import BrokerSettings
from fedmq.transport.wire import Manifest


def _sibling(name: str):
    path = Path(__file__).with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"fedmq_tests_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_e2e = _sibling("test_rounds_e2e")  # its device processes and configuration
TASK, config, start_devices, stop_all = _e2e.TASK, _e2e.config, _e2e.start_devices, _e2e.stop_all

pytestmark = [pytest.mark.security, pytest.mark.timeout(240)]

FLOOD = 10_000


def _flood(url: str, protocol: str, fed: str, device: str, spec_hash: str, started: threading.Event) -> None:
    """Announce itself, then publish FLOOD junk messages on its own update topics."""
    link = MqttLink(BrokerSettings(url=url, protocol=protocol), client_id=device).connect()
    try:
        link.publish_wait(topics.status(fed, device), Status(device, True, TASK, spec_hash, 50).to_bytes(),
                          retain=True)
        manifest = Manifest.build(b"\x01" * 16, b"\x00" * (64 << 10), 16 << 10, inline=False).to_bytes()
        started.set()
        last = None
        for i in range(FLOOD):
            base = topics.update_base(fed, device, f"{i:032x}")
            topic = topics.blob_manifest(base) if i % 2 == 0 else topics.blob_chunk(base, 0)
            last = link.publish(topic, manifest if i % 2 == 0 else b"\x00" * 64, qos=0)
        if last is not None:
            last.wait(60)
    finally:
        link.close()


def test_a_flooding_device_affects_only_itself(mosquitto, tmp_path) -> None:
    fed = "flood"
    spec = ParamSpec.from_module(get_task(TASK).build_model(0))
    devices = start_devices(mosquitto, fed, [("good-0", "good", 50), ("good-1", "good", 60)])
    started = threading.Event()
    flooder = threading.Thread(target=_flood, args=(mosquitto.url, mosquitto.protocol, fed, "noisy", spec.hash,
                                                    started), daemon=True)
    try:
        cfg = config(mosquitto, tmp_path, fed, rounds=2,
                     round={"devices_per_round": 2, "min_updates": 1, "min_devices": 3, "deadline_s": 20.0,
                            "over_selection": 1.0})
        coord = Coordinator(cfg)
        flooder.start()
        assert started.wait(60)
        result = coord.run()
    finally:
        stop_all(devices)
        flooder.join(120)
    # Every round closed, each with two updates (the flooder, when selected, sent nothing valid:
    # the round still closed, at its deadline at worst, with the other device's update).
    assert [r.state for r in result.records] == ["closed"] * 2
    for rec in result.records:
        good = {p.device for p in rec.participations if p.status == "accepted"}
        assert good <= {"good-0", "good-1"} and len(good) >= 1
        assert rec.wall_s < cfg.round.deadline_s + 5
    # Nothing is held for the junk: at most the per-device limit of incomplete transfers.
    count, size = coord.receiver.pending_bytes(topics.update_base(fed, "noisy", ""))
    assert count <= cfg.limits.max_transfers_per_device and size <= count * (64 << 10)
