"""End to end: a real device process, a real mosquitto, and a scripted coordinator side that
chooses each receipt (accepted, rejected, none) to drive the agent through every path. What
it receives is judged by the real round engine, and the updates the device should have
trained are recomputed with the real client-update pipeline (no mocks).

Invariant checked throughout (error feedback, Stich et al. 2018): everything the coordinator
aggregated plus the device's residual plus the update in flight equals the sum of the true
local updates, whatever was accepted, rejected or killed on the way.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edge_client.localdata import load_local_data
from fedmq.fl.client import train_for_task
from fedmq.fl.rounds import Accepted, RoundEngine
from fedmq.fl.training import split_holdout
from fedmq.wire import topics
from fedmq.codecs import CodecSpec, decode
from fedmq.data import load_digits, save_npz_atomic
from fedmq.wire.envelope import decode_update
from fedmq.fl.feedback import ErrorFeedback
from fedmq.wire.messages import ModelPointer, Receipt, Status, RoundTask, TrainPlan
from fedmq.model.modelio import model_from_safetensors, model_to_safetensors
from fedmq.model.params import ParamSpec
from fedmq.tasks import get_task
from fedmq.transport.flows import publish_model
from fedmq.transport.link import Message, MqttLink
from fedmq.transport.receiver import BlobReceiver
from fedmq.transport.settings import BrokerSettings

ROOT = Path(__file__).resolve().parents[2]
FED, DEV, TASK, SEED = "fed", "dev-1", "digits-mlp", 0
#: A local hold-out, so that the val_* metrics of a client update are checked too.
HOLDOUT = 0.1
PLAN = TrainPlan(local_steps=6, local_epochs=0, batch_size=32, lr=0.1, codec=CodecSpec.of(density=0.05), seed=3)

pytestmark = pytest.mark.timeout(180)


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    """Wait until ``predicate()`` is true (checked every 50 ms), failing after ``timeout`` s
    or as soon as the device process exits."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"device exited ({proc.returncode}) while waiting for {what}:\n{_tail(log)}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}:\n{_tail(log)}")
        time.sleep(0.05)


def _tail(log: Path | None) -> str:
    return log.read_text()[-3000:] if log is not None and log.exists() else ""


class Coordinator:
    """The coordinator's side of the protocol for one device, with receipts chosen by the test."""

    def __init__(self, broker) -> None:
        self.link = MqttLink(BrokerSettings(url=broker.url, protocol=broker.protocol), client_id="coord").connect()
        self.updates: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self.status: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self.link.subscribe(topics.update_filter(FED), inbox=self.updates)
        self.link.subscribe(topics.status(FED, DEV), inbox=self.status)
        self.rx = BlobReceiver()
        self.model = get_task(TASK).build_model(7)
        self.spec = ParamSpec.from_module(self.model)
        self.global_bytes = model_to_safetensors(self.model, {"spec_hash": self.spec.hash})
        pointer = ModelPointer(version=1, spec_hash=self.spec.hash, round=0, size=len(self.global_bytes),
                               sha256=hashlib.sha256(self.global_bytes).hexdigest())
        publish_model(self.link, FED, 1, self.global_bytes, pointer)

    def task(self, round: int, deadline_in: float = 120.0, plan: TrainPlan = PLAN) -> None:
        task = RoundTask(federation=FED, device=DEV, round=round, model_version=1, spec_hash=self.spec.hash,
                    deadline=time.time() + deadline_in, plan=plan)
        self.link.publish_wait(topics.task(FED, DEV), task.to_bytes(), retain=True)

    def next_update(self, timeout: float = 60.0) -> tuple[str, bytes]:
        """``(transfer id, envelope bytes)`` of the next complete client update."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = self.updates.get(timeout=left)
            except queue.Empty:
                break
            blob = self.rx.feed(msg.topic, msg.payload)
            if blob is not None:
                return blob.base.rsplit("/", 1)[1], blob.data
        pytest.fail(f"no client update within {timeout} s")

    def receipt(self, round: int, transfer_id: str, status: str, reason: str = "") -> None:
        self.link.publish_wait(topics.receipt(FED, DEV),
                               Receipt(DEV, round, transfer_id, status, reason).to_bytes())

    def close(self) -> None:
        self.link.close()


class Device:
    """The device agent as a separate process, as on a fleet (`python -m edge_client run`)."""

    def __init__(self, tmp: Path, broker) -> None:
        x, y = load_digits()
        self.data = tmp / "part.npz"
        save_npz_atomic(self.data, x[:400], y[:400])
        self.state = tmp / "state"
        self.config = tmp / "edge.toml"
        self.config.write_text(
            f'device_id = "{DEV}"\nfederation = "{FED}"\ntask = "{TASK}"\ndata = "{self.data}"\n'
            f'state_dir = "{self.state}"\nseed = {SEED}\nreceipt_timeout = 60\nreceipt_grace = 0\n'
            f'holdout_fraction = {HOLDOUT}\n'
            f'[broker]\nurl = "{broker.url}"\nprotocol = "{broker.protocol}"\n')
        self.pause_file = tmp / "paused"
        self.log = tmp / "device.log"
        self.proc: subprocess.Popen | None = None

    def start(self, pause_at: str | None = None, **extra_env: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FEDMQ_EDGE_", "NOTIFY_", "WATCHDOG_"))}
        env.update(extra_env, PYTHONPATH=str(ROOT))
        if pause_at:
            env.update(FEDMQ_EDGE_TEST_PAUSE_AT=pause_at, FEDMQ_EDGE_TEST_PAUSE_FILE=str(self.pause_file))
        self.pause_file.unlink(missing_ok=True)
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "edge_client", "run", "-c", str(self.config)],
                                         env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)

    def wait_paused(self, point: str) -> None:
        wait_for(lambda: self.pause_file.exists(), 90, f"pause at {point}", self.proc, self.log)
        assert self.pause_file.read_text() == point

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)
            assert self.proc.returncode == 0, _tail(self.log)

    def record(self) -> dict:
        return json.loads((self.state / "state.json").read_text())

    def residual(self, spec: ParamSpec) -> np.ndarray:
        rec = self.record()
        if rec["residual_file"] is None:
            return np.zeros(spec.size, np.float32)
        return ErrorFeedback.load(self.state / rec["residual_file"], spec).residual

    def inflight_bytes(self) -> bytes | None:
        rec = self.record()
        return None if rec["inflight"] is None else (self.state / rec["inflight"]["update_file"]).read_bytes()


def true_update(coord: Coordinator, device: Device, round: int) -> np.ndarray:
    """What the device trains for ``round``, recomputed with the client-update pipeline."""
    task = get_task(TASK)
    model = task.build_model(SEED)
    model_from_safetensors(coord.global_bytes, model, coord.spec)
    x, y = load_local_data(device.data, task)
    xt, yt, xv, yv = split_holdout(x, y, HOLDOUT, SEED)
    round_task = RoundTask(FED, DEV, round, 1, coord.spec.hash, 0.0, PLAN)
    return train_for_task(model, xt, yt, round_task, seed=SEED, max_seconds=300.0, x_val=xv, y_val=yv).update


def sent_vector(coord: Coordinator, data: bytes, round: int) -> np.ndarray:
    engine = RoundEngine(FED, coord.spec, kind="delta", is_known=lambda d: d == DEV, max_update_bytes=1 << 24)
    engine.open(round, 1, [DEV], 1, time.time() + 60, time.time())
    outcome = engine.offer(DEV, "t", data)
    assert isinstance(outcome, Accepted), outcome
    update = outcome.update
    assert (update.device, update.round, update.base_version, update.kind) == (DEV, round, 1, "delta")
    assert {"train_loss", "val_loss", "val_accuracy"} <= set(update.metrics)
    return decode(update.codec, update.payload, coord.spec)


@pytest.fixture
def coord(mosquitto):
    c = Coordinator(mosquitto)
    yield c
    c.close()


@pytest.fixture
def device(tmp_path, mosquitto):
    d = Device(tmp_path, mosquitto)
    yield d
    if d.proc is not None and d.proc.poll() is None:
        d.proc.kill()
        d.proc.wait(30)


def test_accept_reject_and_error_feedback_invariant(coord, device):
    device.start()
    coord.task(1)
    tid1, u1 = coord.next_update()
    sent1 = sent_vector(coord, u1, 1)
    coord.receipt(1, tid1, "accepted")
    coord.task(2)
    # The device starts round 2 only once round 1 is settled.
    tid2, u2 = coord.next_update()
    sent2 = sent_vector(coord, u2, 2)
    coord.receipt(2, tid2, "rejected", "late")
    coord.task(3)
    tid3, u3 = coord.next_update()
    sent3 = sent_vector(coord, u3, 3)
    device.stop()

    rec = device.record()
    assert rec["last_round"] == 2 and rec["inflight"]["round"] == 3 and rec["inflight"]["transfer_id"] == tid3
    assert device.inflight_bytes() == u3
    truth = sum(true_update(coord, device, r) for r in (1, 2, 3))
    # accepted (1) + in flight (3) + residual == all three true updates: 2 went back to the residual
    np.testing.assert_allclose(sent1 + sent3 + device.residual(coord.spec), truth, atol=2e-5)
    assert not np.allclose(sent2, 0)
    # Status was published online, and offline (retained) on a clean stop.
    statuses = [Status.from_bytes(coord.status.get(timeout=5).payload) for _ in range(2)]
    assert statuses[0].online and statuses[0].spec_hash == coord.spec.hash and statuses[0].samples == 360
    assert (device.state / "models" / "1.safetensors").read_bytes() == coord.global_bytes


def test_kill_during_training_sends_nothing_and_keeps_state(coord, device):
    device.start(pause_at="training")
    coord.task(1)
    device.wait_paused("training")
    device.kill9()
    rec = device.record()
    assert rec["inflight"] is None and rec["last_round"] == -1 and rec["residual_file"] is None
    assert coord.rx.stats["manifests"] == 0

    device.start()
    tid, data = coord.next_update()
    assert coord.rx.stats["manifests"] == 1
    sent = sent_vector(coord, data, 1)
    device.stop()
    assert device.record()["inflight"]["transfer_id"] == tid and device.inflight_bytes() == data
    np.testing.assert_allclose(sent + device.residual(coord.spec), true_update(coord, device, 1), atol=2e-5)


def test_kill_before_publishing_resends_the_same_update(coord, device):
    device.start(pause_at="publishing")
    coord.task(1)
    device.wait_paused("publishing")
    committed = device.record()["inflight"]
    committed_bytes = device.inflight_bytes()
    residual_before = device.residual(coord.spec)
    device.kill9()
    assert coord.rx.stats["manifests"] == 0

    device.start()
    tid, data = coord.next_update()
    # The same bytes under the same transfer id: never a second, different update for round 1.
    assert (tid, data) == (committed["transfer_id"], committed_bytes)
    sent1 = sent_vector(coord, data, 1)
    np.testing.assert_allclose(sent1 + residual_before, true_update(coord, device, 1), atol=2e-5)
    coord.receipt(1, tid, "accepted")
    coord.task(2)
    tid2, data2 = coord.next_update()
    sent2 = sent_vector(coord, data2, 2)
    device.stop()
    truth = true_update(coord, device, 1) + true_update(coord, device, 2)
    np.testing.assert_allclose(sent1 + sent2 + device.residual(coord.spec), truth, atol=2e-5)


def test_kill_after_publishing_settles_by_the_receipt_kept_in_the_session(coord, device):
    device.start(pause_at="published")
    coord.task(1)
    device.wait_paused("published")
    tid, data = coord.next_update()
    assert (tid, data) == (device.record()["inflight"]["transfer_id"], device.inflight_bytes())
    device.kill9()
    # The receipt goes out while the device is down: its MQTT 5 session keeps it.
    coord.receipt(1, tid, "accepted")
    device.start()
    # Settled by the receipt kept in the session; then, as after every start, the last
    # accepted update is sent once more as a question (its coordinator may have died before
    # checkpointing the round). The coordinator answers with what it stored.
    tid_again, data_again = coord.next_update()
    assert (tid_again, data_again) == (tid, data)
    coord.receipt(1, tid, "accepted")
    wait_for(lambda: device.record()["inflight"] is None, 30, "settled again", device.proc, device.log)
    coord.task(2)
    tid2, data2 = coord.next_update()
    assert decode_update(data2, coord.spec).round == 2, "round 1 must not be trained or sent as a new update"
    assert coord.rx.stats["manifests"] == 3
    assert [e["state"] for e in device.record()["ledger"]] == ["accepted", "sent"]
    sent1, sent2 = sent_vector(coord, data, 1), sent_vector(coord, data2, 2)
    device.stop()
    assert device.record()["last_round"] == 1
    truth = true_update(coord, device, 1) + true_update(coord, device, 2)
    np.testing.assert_allclose(sent1 + sent2 + device.residual(coord.spec), truth, atol=2e-5)


def test_no_receipt_by_the_deadline_asks_again_and_rolls_back_on_the_answer(coord, device):
    device.start()
    coord.task(1, deadline_in=8.0)
    tid, data = coord.next_update()
    sent = sent_vector(coord, data, 1)
    # No receipt by the deadline (receipt_grace = 0): the device does not guess. It sends the
    # same transfer again (receipt_timeout is 60 s, so this is the deadline's question) and
    # keeps the update in flight until the coordinator answers.
    tid2, data2 = coord.next_update(timeout=30)
    assert (tid2, data2) == (tid, data), "the same transfer was not sent again at the deadline"
    assert device.record()["inflight"] is not None
    coord.receipt(1, tid, "rejected", "late")
    wait_for(lambda: device.record()["inflight"] is None, 60, "rollback on the answer", device.proc, device.log)
    assert device.record()["ledger"][-1] == {"round": 1, "transfer_id": tid, "state": "rolled_back",
                                             "reason": "late"}
    device.stop()
    rec = device.record()
    assert rec["last_round"] == 1
    np.testing.assert_allclose(device.residual(coord.spec), true_update(coord, device, 1), atol=2e-5)
    assert not np.allclose(sent, 0)


def test_a_receipt_for_the_transfer_in_flight_settles_it_whatever_round_it_names(coord, device):
    device.start()
    coord.task(1)
    tid, _ = coord.next_update()
    coord.receipt(1, "f" * 32, "rejected", "late")  # another transfer: not this update's answer
    # A coordinator from before issue 27 named the round in progress in a refusal decided
    # from the manifest: the transfer id still names this update, so the device settles.
    coord.receipt(2, tid, "rejected", "late")
    wait_for(lambda: device.record()["inflight"] is None, 60, "rollback on the answer", device.proc, device.log)
    assert [e for e in device.record()["ledger"] if e["state"] != "sent"] == [
        {"round": 1, "transfer_id": tid, "state": "rolled_back", "reason": "late"}]
    device.stop()


def test_watchdog_keeps_pinging_while_training(coord, device, tmp_path):
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(60)
        # WatchdogSec=0.4 s: a ping every 0.2 s; local training below lasts well over that.
        device.start(NOTIFY_SOCKET=path, WATCHDOG_USEC="400000")
        coord.task(1, plan=TrainPlan(local_steps=3000, local_epochs=0, batch_size=64, lr=0.05, seed=3))
        seen: list[str] = []
        while not any(m.startswith("STATUS=round 1: sending") for m in seen):
            seen.append(sock.recv(4096).decode())
        device.stop()
    assert seen[0].startswith("READY=1")
    training = seen.index("STATUS=round 1: training")
    during = seen[training + 1:-1]
    assert during.count("WATCHDOG=1") >= 2, seen


def test_one_round_over_the_embedded_mqtt311_broker(embedded_broker, tmp_path):
    coord = Coordinator(embedded_broker)
    device = Device(tmp_path, embedded_broker)
    try:
        device.start()
        coord.task(1)
        tid, data = coord.next_update()
        sent = sent_vector(coord, data, 1)
        coord.receipt(1, tid, "accepted")
        coord.task(2)
        coord.next_update()
        device.stop()
        assert device.record()["last_round"] == 1
        truth = true_update(coord, device, 1) + true_update(coord, device, 2)
        np.testing.assert_allclose(sent + decode("topk-int8", decode_update(device.inflight_bytes(), coord.spec)
                                                 .payload, coord.spec) + device.residual(coord.spec), truth,
                                   atol=2e-5)
    finally:
        if device.proc is not None and device.proc.poll() is None:
            device.proc.kill()
        coord.close()
