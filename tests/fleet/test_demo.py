"""The main job end to end: `fedmq demo` with real device processes, real data, real brokers.

A short federation (3 devices, 3 rounds) runs on the embedded broker and on mosquitto. An
independent MQTT subscriber, started by the test, counts the client-update payload bytes
that really crossed the broker and the receipts the coordinator sent, so the byte counts
in summary.json are checked against the wire, not against the coordinator's own books.
"""

from __future__ import annotations

import json
import queue
import threading
from collections import defaultdict
from pathlib import Path

import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fleet.demo import DemoSettings, run_demo
from fedmq.data import digits_split
from fedmq.wire.messages import Receipt
from fedmq.model.modelio import OnnxPredictor, model_from_safetensors
from fedmq.tasks import get_task

SUMMARY_KEYS = {"task", "devices", "rounds", "final_accuracy", "accuracy_per_round", "bytes_up_total",
                "bytes_up_dense_equivalent", "uplink_ratio", "bytes_down_total", "updates_accepted",
                "updates_rejected", "wall_seconds"}


class WireTap:
    """Counts payload bytes per client-update transfer and collects receipts, on its own connection."""

    def __init__(self, port: int, protocol: str) -> None:
        version = paho.MQTTv5 if protocol == "5" else paho.MQTTv311
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="wiretap", protocol=version)
        self.bytes_by_transfer: dict[str, int] = defaultdict(int)
        self.receipts: queue.SimpleQueue[Receipt] = queue.SimpleQueue()
        self.subscribed = threading.Event()
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *args: self.subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.subscribe([("fedmq/demo/update/#", 1), ("fedmq/demo/receipt/+", 1)])
        self.client.loop_start()
        assert self.subscribed.wait(10), "wire tap could not subscribe"

    def _on_message(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        levels = msg.topic.split("/")
        if levels[2] == "update":
            self.bytes_by_transfer[levels[4]] += len(msg.payload)
        else:
            self.receipts.put(Receipt.from_bytes(msg.payload))

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_short_demo_learns_and_reports_true_bytes(broker, tmp_path: Path) -> None:
    tap = WireTap(broker.port, broker.protocol)
    try:
        summary = run_demo(DemoSettings(
            devices=3, per_round=2, rounds=3, broker=broker.url, protocol=broker.protocol, out=tmp_path,
            deadline_s=60.0))
        answered = summary["updates_accepted"] + summary["updates_rejected"]
        receipts = [tap.receipts.get(timeout=30) for _ in range(answered)]
    finally:
        tap.close()

    assert SUMMARY_KEYS <= set(summary)
    # summary.json is the summary; run_demo also hands its caller every round's record.
    assert json.loads((tmp_path / "summary.json").read_text()) == {k: v for k, v in summary.items() if k != "records"}
    assert [r["round"] for r in summary["records"]] == [1, 2, 3]
    assert summary["rounds"] == 3 and summary["devices"] == 3
    assert summary["updates_accepted"] >= 3 * 1
    # Learning: the global model beats the initial one on the held-out digits.
    assert summary["final_accuracy"] > summary["initial_accuracy"] + 0.05
    # The coordinator's byte count equals the payload bytes of the transfers it answered.
    on_wire = sum(tap.bytes_by_transfer[r.transfer_id] for r in receipts)
    assert summary["bytes_up_total"] == on_wire > 0
    assert summary["uplink_ratio"] > 50

    for name in ("rounds.csv", "model.safetensors", "model.onnx", "progress.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert len((tmp_path / "rounds.csv").read_text().strip().splitlines()) == 1 + 3


@pytest.mark.timeout(120)
def test_demo_onnx_export_predicts_like_the_torch_model(embedded_broker, tmp_path: Path) -> None:
    run_demo(DemoSettings(
        devices=2, per_round=1, rounds=1, broker=embedded_broker.url, protocol="3.1.1", out=tmp_path))
    task = get_task("digits-mlp")
    model = task.build_model(seed=123)
    model_from_safetensors((tmp_path / "model.safetensors").read_bytes(), model)
    x_test = digits_split()[2]
    import torch

    with torch.no_grad():
        torch_logits = model(torch.from_numpy(x_test)).numpy()
    onnx_logits = OnnxPredictor((tmp_path / "model.onnx").read_bytes()).logits(x_test)
    np.testing.assert_allclose(onnx_logits, torch_logits, atol=1e-4)
    assert (onnx_logits.argmax(1) == torch_logits.argmax(1)).all()
