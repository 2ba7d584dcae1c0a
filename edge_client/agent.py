"""The device agent: one loop that takes tasks, trains, sends client updates and settles them.

Lifecycle (docs/edge-client.md has the sequence diagram):

1. connect (MQTT 5 persistent session keyed by the device id, or 3.1.1), with a retained
   last will ``Status(online=False)`` on ``fedmq/F/status/D``; publish the retained
   ``Status(online=True, task, spec_hash, samples, software)``; subscribe to the device's
   task, receipt and transfer-request topics; tell systemd READY;
2. an update left in flight by a previous run is sent again (same bytes, same transfer
   id) or, past its round's deadline, rolled back into the residual;
3. for each task of a round not yet done: fetch the global model version it names (from
   the local cache when there), train (:func:`fedmq.fl.training.train_local`, in a
   worker thread so the main loop keeps pinging the watchdog), compress with error
   feedback, commit residual + update to disk (:class:`edge_client.state.DeviceState`),
   then publish the update as a chunked blob under ``fedmq/F/update/D/T``;
4. on the coordinator's Receipt: ``accepted`` commits; a rejection, or no receipt by the
   round's deadline plus ``receipt_grace``, puts the sent update back into the residual
   (the coordinator answers a resend of a transfer it already judged with its first
   answer). Transfer requests are answered by resending chunks;
   with no receipt after ``receipt_timeout`` seconds the whole update is sent again.

Only the main thread touches the durable state and the error-feedback memory; paho's
callbacks only queue messages (fedmq.transport.MqttLink).

Test hook: with ``FEDMQ_EDGE_TEST_PAUSE_AT`` set to ``training`` (model trained, nothing
committed), ``publishing`` (update committed to disk, nothing published) or ``published``
(update published, receipt not yet handled), the agent writes the point's name to the file
``FEDMQ_EDGE_TEST_PAUSE_FILE`` and blocks there forever, so that a test can kill it at
that exact point.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import secrets
import threading
import time
from collections import Counter
from dataclasses import replace
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import numpy as np
import torch

from edge_client.config import EdgeConfig
from edge_client.localdata import load_local_data
from edge_client.sdnotify import Notifier
from edge_client.state import DeviceState, lock_state_dir
from fedmq.fl.client import package_update, train_for_task
from fedmq.fl.training import LocalResult, split_holdout
from fedmq import __version__, topics
from fedmq.atomic import atomic_write_text
from fedmq.codecs import decode
from fedmq.envelope import decode_update
from fedmq.errors import FedmqError, TransferError, TransportError, WireError
from fedmq.chain import DeltaBlob, ModelChain
from fedmq.fl import downlink
from fedmq.fl.downlink import params_sha256
from fedmq.messages import Receipt, Status, Task
from fedmq.modelio import model_from_safetensors, model_to_safetensors
from fedmq.params import ParamSpec, flatten_params, load_params
from fedmq.tasks import get_task
from fedmq.transport.flows import fetch_blob, fetch_model
from fedmq.transport import Link, Message, Will, open_link
from fedmq.transport.counting import LINK_BYTES_IN, LINK_BYTES_OUT, CountingLink
from fedmq.transport.sender import BlobSender
from fedmq.transport.settings import BrokerSettings

log = logging.getLogger(__name__)

PAUSE_ENV = "FEDMQ_EDGE_TEST_PAUSE_AT"
PAUSE_FILE_ENV = "FEDMQ_EDGE_TEST_PAUSE_FILE"
PAUSE_POINTS = ("training", "publishing", "published")

#: Longest wait of the main loop between two looks at its clocks, seconds.
TICK = 1.0
#: Seconds one publish of a whole update may take before it is retried later.
SEND_TIMEOUT = 30.0

T = TypeVar("T")


def broker_settings(cfg: EdgeConfig) -> BrokerSettings:
    """Transport settings of an edge configuration (persistent session with MQTT 5)."""
    def path(p: Any) -> str | None:
        return None if p is None else str(p)

    return BrokerSettings(url=cfg.broker_url, protocol=cfg.protocol, username_file=path(cfg.username_file),
                          password_file=path(cfg.password_file), ca_file=path(cfg.tls_ca),
                          cert_file=path(cfg.tls_cert), key_file=path(cfg.tls_key), keepalive=cfg.keepalive,
                          session_expiry=cfg.session_expiry if cfg.protocol == "5" else 0)


def fetch_latest_onnx(cfg: EdgeConfig, timeout: float = 30.0) -> bytes:
    """The latest ONNX export of the global model from the broker (``fedmq/F/onnx/latest``
    and the retained blob it points to), fetched on a short-lived clean connection.

    Raises:
        TransferError: no export announced or not complete within ``timeout`` seconds.
        TransportError: the broker cannot be reached.
    """
    settings = broker_settings(cfg).with_(session_expiry=0, connect_timeout=timeout)
    link = open_link(settings, client_id=f"{cfg.device_id}-predict-{secrets.token_hex(3)}")
    with link:
        _, blob = fetch_model(link, cfg.federation, kind="onnx", timeout=timeout)
    return blob.data


class _Worker:
    """Runs one call on a daemon thread so the main loop stays free to ping the watchdog
    (a daemon thread: a stop request never waits for local training to end)."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.started = time.monotonic()
        self._done: queue.SimpleQueue[tuple[bool, Any]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True, name="edge-worker")
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self._done.put((True, fn()))
        except BaseException as exc:  # handed to the main thread, which decides
            self._done.put((False, exc))

    def wait(self, timeout: float) -> tuple[bool, Any] | None:
        try:
            return self._done.get(timeout=timeout)
        except queue.Empty:
            return None


class EdgeAgent:
    """The device agent for one configuration.

    Construction loads the task's model, the local data and the durable state (no network).

    Args:
        cfg: validated configuration.
        link: the connection to the broker, not yet connected (default:
            :func:`fedmq.transport.open_link` for ``cfg.broker_url``, chosen by the URL's
            scheme, with the device id as client id). The agent sets its last will on it.
        notifier: systemd notifier (from the environment when None).
        environ: environment for the test hook (``os.environ`` when None).

    Attributes:
        counters: ``rounds_trained``, ``updates_sent``, ``accepted``, ``rejected``,
            ``rolled_back``, ``resends``, ``repairs``, ``bad_messages``, ``late_tasks``.

    Raises:
        ConfigError: unknown task. DataError: missing or corrupt data (names the path).
        StateError: corrupt state directory (names the path).
    """

    def __init__(self, cfg: EdgeConfig, *, link: Link | None = None, notifier: Notifier | None = None,
                 environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.cfg = cfg
        self.notifier = notifier if notifier is not None else Notifier(env)
        self.pause_at = env.get(PAUSE_ENV) or None
        self.pause_file = env.get(PAUSE_FILE_ENV) or None
        torch.set_num_threads(cfg.torch_threads)
        self.task_def = get_task(cfg.task)
        self.model = self.task_def.build_model(cfg.seed)
        self.spec = ParamSpec.from_module(self.model)
        x, y = load_local_data(cfg.data, self.task_def)
        self.x, self.y, self.x_val, self.y_val = split_holdout(x, y, cfg.holdout_fraction, cfg.seed)
        self._state_lock = lock_state_dir(cfg.state_dir)
        self.state = DeviceState(cfg.state_dir)
        self.feedback = self.state.load_feedback(self.spec)
        self.counters: Counter[str] = Counter()
        self.link = CountingLink(link if link is not None else open_link(broker_settings(cfg), client_id=cfg.device_id))
        self._reported = self.link.traffic.snapshot()
        self.sender: BlobSender | None = None
        self._last_ping = 0.0
        self._last_send = 0.0
        self._connects_seen = 0
        self._pending: Task | None = None
        # Compressed downlink: the newest version chain seen, and the global model version
        # this device holds (float32 vector, apart from the model training changes).
        self._chain: ModelChain | None = None
        self._held: tuple[int, np.ndarray] | None = None

    # -- helpers --------------------------------------------------------------------------

    def _status(self, online: bool) -> bytes:
        return Status(device=self.cfg.device_id, online=online, task=self.task_def.name, spec_hash=self.spec.hash,
                      samples=len(self.y), software=f"fedmq-edge {__version__}", ts=time.time()).to_bytes()

    def _healthy_tick(self, worker: _Worker | None = None, limit: float = math.inf) -> None:
        """Ping the watchdog if the link is up and the worker (if any) is within its time
        limit; republish the online status after a reconnect (the broker published our last
        will when the link dropped)."""
        link = self.link
        healthy = link.connected and (worker is None or time.monotonic() - worker.started <= limit)
        interval = self.notifier.watchdog_interval
        if healthy and interval is not None and time.monotonic() - self._last_ping >= interval:
            self.notifier.watchdog()
            self._last_ping = time.monotonic()
        if link.connected and link.connects != self._connects_seen:
            self._connects_seen = link.connects
            link.publish(topics.status(self.cfg.federation, self.cfg.device_id), self._status(True), retain=True)

    def _in_worker(self, fn: Callable[[], T], limit: float, stop: threading.Event) -> T | None:
        """Run ``fn`` off the main thread, pinging the watchdog while it stays within
        ``limit`` seconds. Returns None when stop was requested first; re-raises its error."""
        worker = _Worker(fn)
        while True:
            outcome = worker.wait(min(TICK, self.notifier.watchdog_interval or TICK))
            if outcome is not None:
                ok, value = outcome
                if ok:
                    return value
                raise value
            if stop.is_set():
                return None
            self._healthy_tick(worker, limit)

    def _pause(self, point: str) -> None:
        if self.pause_at != point:
            return
        if self.pause_file:
            atomic_write_text(self.pause_file, point)
        log.warning("test hook: paused at %s (pid %d)", point, os.getpid())
        threading.Event().wait()

    def _sent_vector(self, data: bytes) -> np.ndarray:
        update = decode_update(data, self.spec)
        return decode(update.codec, update.payload, self.spec)

    def _base(self, transfer_id: str) -> str:
        return topics.update_base(self.cfg.federation, self.cfg.device_id, transfer_id)

    # -- the loop -------------------------------------------------------------------------

    def run(self, stop: threading.Event | None = None) -> None:
        """Connect and serve tasks until ``stop`` is set (SIGTERM / SIGINT in the CLI).

        Raises:
            TransportError: the broker refused the connection or cannot be reached at start.
            StateError: the state directory cannot be written.
        """
        stop = stop if stop is not None else threading.Event()
        cfg = self.cfg
        fed, dev = cfg.federation, cfg.device_id
        link = self.link
        link.set_will(Will(topics.status(fed, dev), self._status(False), qos=1, retain=True))
        self.sender = BlobSender(link)
        link.connect()
        try:
            self._connects_seen = link.connects
            # A follower keeps the version chain subscribed; the others read it when a task
            # needs it (each chain update is a few KB that a device not selected has no use for).
            link.subscribe(([topics.model_chain(fed)] if cfg.model_follow else [])
                           + [topics.task(fed, dev), topics.receipt(fed, dev), topics.transfer_requests(fed, dev)],
                           qos=1)
            link.publish_wait(topics.status(fed, dev), self._status(True), retain=True)
            self.notifier.ready(f"online, last round {self.state.record.last_round}")
            log.info("device %s online in federation %s (task %s, %d samples, spec %s, state %s)", dev, fed,
                     self.task_def.name, len(self.y), self.spec.hash, cfg.state_dir)
            if self.state.record.inflight is not None:
                # A receipt the broker kept in our persistent session settles the update
                # without sending it again.
                self._drain()
            if self.state.record.inflight is not None:
                self._resume_inflight()
            while not stop.is_set():
                self._healthy_tick()
                self._check_inflight()
                if self._pending is not None and self.state.record.inflight is None:
                    task, self._pending = self._pending, None
                    self._run_round(task, stop)
                    continue
                if self._should_follow():
                    self._follow(stop)
                    continue
                try:
                    msg = link.inbox.get(timeout=min(TICK, self.notifier.watchdog_interval or TICK))
                except queue.Empty:
                    continue
                self._handle(msg)
        finally:
            self.notifier.stopping()
            if link.connected:
                try:
                    link.publish_wait(topics.status(fed, dev), self._status(False), retain=True, timeout=5.0)
                except TransportError as exc:
                    log.warning("offline status not acknowledged: %s", exc)
            link.close()

    def _drain(self) -> None:
        """Handle every message already received, without waiting."""
        while True:
            try:
                msg = self.link.inbox.get_nowait()
            except queue.Empty:
                return
            self._handle(msg)

    def _handle(self, msg: Message) -> None:
        fed, dev = self.cfg.federation, self.cfg.device_id
        if not msg.payload:
            return  # a cleared retained message
        try:
            if msg.topic == topics.task(fed, dev):
                self._on_task(Task.from_bytes(msg.payload))
            elif msg.topic == topics.receipt(fed, dev):
                self._on_receipt(Receipt.from_bytes(msg.payload))
            elif msg.topic == topics.model_chain(fed):
                chain = ModelChain.from_bytes(msg.payload)
                if self._chain is None or chain.latest >= self._chain.latest:
                    self._chain = chain
            elif msg.topic == topics.transfer_requests(fed, dev):
                assert self.sender is not None
                if self.sender.handle_request(msg.payload, timeout=SEND_TIMEOUT):
                    self.counters["repairs"] += 1
            else:
                log.debug("message on unexpected topic %s ignored", msg.topic)
        except WireError as exc:
            self.counters["bad_messages"] += 1
            log.warning("malformed message on %s ignored: %s", msg.topic, exc)
        except TransportError as exc:
            log.warning("answering %s failed: %s (the sender retries)", msg.topic, exc)

    def _on_task(self, task: Task) -> None:
        cfg = self.cfg
        if task.federation != cfg.federation or task.device != cfg.device_id:
            self.counters["bad_messages"] += 1
            log.warning("task for %s/%s on this device's topic ignored", task.federation, task.device)
            return
        inflight = self.state.record.inflight
        rec = self.state.record
        rerun = task.round == rec.last_round and task.deadline > rec.last_deadline and inflight is None
        if (task.round <= rec.last_round and not rerun) or (inflight is not None and task.round <= inflight.round):
            log.debug("task for round %d ignored: already done or in flight", task.round)
            return
        if rerun:
            # Same round, later deadline: the coordinator crashed before it checkpointed the
            # round and runs it again; what this device sent for it was lost with the crash.
            log.info("round %d is being rerun by the coordinator: training again", task.round)
        if inflight is not None:
            # The coordinator moved on to a later round without answering ours.
            log.info("round %d superseded by round %d without a receipt: update rolled back", inflight.round,
                     task.round)
            self._rollback()
        if self._pending is None or task.round >= self._pending.round:
            self._pending = task

    def _on_receipt(self, receipt: Receipt) -> None:
        inflight = self.state.record.inflight
        if receipt.device != self.cfg.device_id or inflight is None or receipt.round != inflight.round \
                or receipt.transfer_id != inflight.transfer_id:
            log.info("receipt for round %d (%s) does not match the update in flight: ignored", receipt.round,
                     receipt.transfer_id)
            return
        assert self.sender is not None
        self.sender.acknowledge(self._base(inflight.transfer_id))
        if receipt.status == "accepted":
            self.state.commit()
            self.counters["accepted"] += 1
            log.info("round %d: update accepted", inflight.round)
        else:
            self.counters["rejected"] += 1
            log.warning("round %d: update rejected (%s): rolled back into the residual", inflight.round,
                        receipt.reason)
            self._rollback()
        self.notifier.status(f"idle, last round {self.state.record.last_round}")

    def _rollback(self) -> None:
        self.state.rollback(self.feedback, self._sent_vector(self.state.read_inflight()))
        self.counters["rolled_back"] += 1

    def _check_inflight(self) -> None:
        inflight = self.state.record.inflight
        if inflight is None:
            return
        if time.time() > inflight.deadline + self.cfg.receipt_grace:
            log.warning("round %d: no receipt by the deadline: update rolled back into the residual", inflight.round)
            assert self.sender is not None
            self.sender.acknowledge(self._base(inflight.transfer_id))
            self._rollback()
        elif time.monotonic() - self._last_send >= self.cfg.receipt_timeout:
            self.counters["resends"] += 1
            self._send_inflight()

    def _resume_inflight(self) -> None:
        inflight = self.state.record.inflight
        assert inflight is not None
        if time.time() > inflight.deadline + self.cfg.receipt_grace:
            log.warning("round %d: update left in flight by the last run is past its deadline: rolled back",
                        inflight.round)
            self._rollback()
            return
        log.info("round %d: sending the update left in flight by the last run again (transfer %s)",
                 inflight.round, inflight.transfer_id)
        self._send_inflight()

    def _send_inflight(self) -> None:
        """(Re)publish the committed update: the same bytes under the same transfer id."""
        inflight = self.state.record.inflight
        assert inflight is not None and self.sender is not None
        self._last_send = time.monotonic()
        try:
            self.sender.send(self._base(inflight.transfer_id), self.state.read_inflight(), timeout=SEND_TIMEOUT)
        except TransportError as exc:
            log.warning("round %d: publishing the update failed (%s); retried in %.0f s", inflight.round, exc,
                        self.cfg.receipt_timeout)

    # -- one round ------------------------------------------------------------------------

    def _should_follow(self) -> bool:
        chain = self._chain
        return (self.cfg.model_follow and chain is not None and chain.spec_hash == self.spec.hash
                and (self._held is None or self._held[0] < chain.latest))

    def _follow(self, stop: threading.Event) -> None:
        """Fetch the newest version now (``model_follow``): one delta per version."""
        chain = self._chain
        assert chain is not None
        try:
            self._load_global(chain.latest, stop, chain.latest_sha256)
        except FedmqError as exc:
            log.warning("following version %d failed (%s): retried with the next chain", chain.latest, exc)
            self._chain = None

    def _wait_for_chain(self, version: int, stop: threading.Event) -> ModelChain:
        """The version chain once it names ``version`` (it is published before any task for it).

        Raises: TransferError when none comes within ``fetch_timeout`` seconds."""
        end = time.monotonic() + self.cfg.fetch_timeout
        topic = topics.model_chain(self.cfg.federation)
        subscribed = False
        try:
            while self._chain is None or self._chain.latest < version:
                if stop.is_set() or time.monotonic() >= end:
                    raise TransferError(f"no version chain naming version {version} within "
                                        f"{self.cfg.fetch_timeout:.0f} s on {topic}")
                if not subscribed and not self.cfg.model_follow:
                    self.link.subscribe(topic, timeout=max(1.0, end - time.monotonic()))  # the retained chain
                    subscribed = True
                try:
                    msg = self.link.inbox.get(timeout=TICK)
                except queue.Empty:
                    continue
                self._handle(msg)
        finally:
            if subscribed:
                self.link.unsubscribe(topic)
        return self._chain

    def _held_version(self, chain: ModelChain, target: int) -> tuple[int, np.ndarray] | None:
        """The newest version at most ``target`` this device holds: in memory, in the cache,
        or version 0 built from the task and the federation's seed when its hash matches."""
        if self._held is not None and self._held[0] <= target:
            return self._held
        for version in reversed(self.state.cached_versions()):
            if version > target:
                continue
            data = self.state.cached_model(version)
            try:
                model_from_safetensors(data or b"", self.model, self.spec)
            except WireError as exc:
                log.warning("cached model version %d unusable (%s): dropped", version, exc)
                self.state.drop_model(version)
                continue
            return version, flatten_params(self.model, self.spec)
        origin = flatten_params(self.task_def.build_model(chain.seed), self.spec)
        if params_sha256(origin) == chain.origin_sha256:
            return 0, origin
        log.warning("version 0 built from seed %d does not match the announced hash (another torch build or "
                    "platform?): the snapshot is downloaded", chain.seed)
        return None

    def _catch_up(self, chain: ModelChain, held: tuple[int, np.ndarray] | None, version: int,
                  expected: str) -> np.ndarray:
        """Download what the catch-up rule picks (fedmq.fl.downlink.plan_catch_up) and return
        version ``version``'s vector, verified against ``expected``; on a missing or corrupt
        delta, a gap or a hash mismatch, log why and take the snapshot path instead.

        Raises: TransferError / WireError when the snapshot path fails too."""
        sizes = chain.delta_sizes()
        avoid = False
        while True:
            plan = downlink.plan_catch_up(None if held is None else held[0], version, sizes, chain.snapshot.version,
                                          chain.snapshot.size, avoid_deltas=avoid)
            if plan is None:
                raise TransferError(f"version {version} cannot be reached from the chain (snapshot "
                                    f"{chain.snapshot.version}, deltas {sorted(sizes)[:3]}..)")
            log.info("catching up to version %d: %s (%d bytes)", version, plan.reason, plan.cost)
            try:
                return self._apply_plan(chain, plan, held, version, expected)
            except FedmqError as exc:
                if plan.snapshot is not None:
                    raise
                log.warning("delta path to version %d failed (%s): falling back to the snapshot", version, exc)
                self.counters["downlink_fallbacks"] += 1
                avoid = True

    def _apply_plan(self, chain: ModelChain, plan: downlink.CatchUp, held: tuple[int, np.ndarray] | None,
                    version: int, expected: str) -> np.ndarray:
        fed = self.cfg.federation
        if plan.snapshot is not None:
            blob = fetch_blob(self.link, topics.model_blob(fed, plan.snapshot), self.cfg.fetch_timeout)
            if blob.sha256 != chain.snapshot.blob_sha256:
                raise TransferError(f"snapshot {plan.snapshot}: blob sha256 {blob.sha256[:12]} differs from the "
                                    f"chain's {chain.snapshot.blob_sha256[:12]}")
            model = self.task_def.build_model(chain.seed)
            model_from_safetensors(blob.data, model, self.spec)
            vec = flatten_params(model, self.spec)
            if params_sha256(vec) != chain.snapshot.sha256:
                raise TransferError(f"snapshot {plan.snapshot}: parameter hash differs from the chain's")
        else:
            assert held is not None
            vec = held[1]
        for v in plan.deltas:
            entry = chain.entry(v)
            assert entry is not None
            blob = fetch_blob(self.link, topics.model_delta(fed, v), self.cfg.delta_fetch_timeout)
            if blob.sha256 != entry.blob_sha256:
                raise TransferError(f"delta {v}: blob sha256 {blob.sha256[:12]} differs from the chain's")
            delta = DeltaBlob.from_bytes(blob.data)
            if delta.version != v:
                raise TransferError(f"delta blob on the topic of version {v} is for version {delta.version}")
            vec = delta.apply(vec, self.spec)
            self.counters["deltas_applied"] += 1
        got = params_sha256(vec)
        if got != expected:
            raise TransferError(f"version {version}: parameter hash {got[:12]} after applying, expected {expected[:12]}")
        return vec

    def _load_global(self, version: int, stop: threading.Event, expected_sha256: str = "") -> bool:
        """Load global model ``version`` into the model, from the cache or the broker (with a
        compressed downlink, ``expected_sha256`` set: through the version chain).
        False when stop was requested."""
        if expected_sha256:
            return self._load_chained(version, stop, expected_sha256)
        cached = self.state.cached_model(version)
        if cached is not None:
            try:
                model_from_safetensors(cached, self.model, self.spec)
                return True
            except WireError as exc:
                log.warning("cached model version %d unusable (%s): fetched again", version, exc)
                self.state.drop_model(version)
        base = topics.model_blob(self.cfg.federation, version)
        timeout = self.cfg.fetch_timeout
        blob = self._in_worker(lambda: fetch_blob(self.link, base, timeout), timeout + 30.0, stop)
        if blob is None:
            return False
        model_from_safetensors(blob.data, self.model, self.spec)
        self.state.cache_model(version, blob.data)
        return True

    def _load_chained(self, version: int, stop: threading.Event, expected: str) -> bool:
        if self._held is not None and self._held[0] == version and params_sha256(self._held[1]) == expected:
            load_params(self.model, self._held[1], self.spec)
            return True
        chain = self._wait_for_chain(version, stop)
        held = self._held_version(chain, version)
        if held is not None and held[0] == version and params_sha256(held[1]) == expected:
            vec = held[1]
        else:
            limit = self.cfg.fetch_timeout + 30.0 * (1 + version - (held[0] if held else 0))
            result = self._in_worker(lambda: self._catch_up(chain, held, version, expected), limit, stop)
            if result is None:
                return False
            vec = result
        load_params(self.model, vec, self.spec)
        self._held = (version, vec)
        self.state.cache_model(version, model_to_safetensors(self.model, {"version": str(version),
                                                                          "sha256": expected}))
        return True

    def _run_round(self, task: Task, stop: threading.Event) -> None:
        cfg = self.cfg
        if task.spec_hash != self.spec.hash:
            log.error("round %d: task is for model %s, this device has %s (task %s): skipped", task.round,
                      task.spec_hash, self.spec.hash, cfg.task)
            self.state.finish_round(task.round, task.deadline)
            return
        if time.time() >= task.deadline:
            self.counters["late_tasks"] += 1
            log.warning("round %d: deadline already passed: skipped", task.round)
            self.state.finish_round(task.round, task.deadline)
            return
        self.notifier.status(f"round {task.round}: fetching model {task.model_version}")
        try:
            if not self._load_global(task.model_version, stop, task.model_sha256):
                return
        except FedmqError as exc:
            log.error("round %d: global model %d unavailable (%s): skipped", task.round, task.model_version, exc)
            self.state.finish_round(task.round, task.deadline)
            return

        plan = task.plan
        cap = min(c for c in (plan.max_seconds, cfg.max_train_seconds) if c > 0)
        self.notifier.status(f"round {task.round}: training")
        result: LocalResult | None = self._in_worker(
            lambda: train_for_task(self.model, self.x, self.y, task, seed=cfg.seed, max_seconds=cap,
                                   x_val=self.x_val, y_val=self.y_val),
            2 * cap + 60.0, stop)
        if result is None:
            return
        self.counters["rounds_trained"] += 1
        self._pause("training")

        if time.time() >= task.deadline:
            # Too late to count: keep what it learned in the residual instead.
            log.warning("round %d: training ended after the deadline: update kept in the residual", task.round)
            if plan.error_feedback:
                self.feedback.rollback(result.update)
            self.state.save_residual(self.feedback, task.round, task.deadline)
            return
        # What this link carried since the last update, reported with this one (counting).
        traffic = self.link.traffic.snapshot()
        result = replace(result, metrics=dict(result.metrics, **{
            LINK_BYTES_IN: float(traffic["bytes_in"] - self._reported["bytes_in"]),
            LINK_BYTES_OUT: float(traffic["bytes_out"] - self._reported["bytes_out"])}))
        self._reported = traffic
        packaged = package_update(result, task, federation=cfg.federation, device=cfg.device_id, spec=self.spec,
                                  feedback=self.feedback, seed=cfg.seed)
        data = packaged.data
        inflight = self.state.begin_update(self.feedback, data, round=task.round, transfer_id=secrets.token_hex(16),
                                           base_version=task.model_version, deadline=task.deadline,
                                           with_feedback=plan.error_feedback)
        self._pause("publishing")
        self.notifier.status(f"round {task.round}: sending update ({len(data)} bytes)")
        self._send_inflight()
        self.counters["updates_sent"] += 1
        log.info("round %d: update sent (%d bytes, transfer %s, %d steps in %.2f s, train loss %.4f)",
                 task.round, len(data), inflight.transfer_id, result.steps, result.seconds,
                 result.metrics.get("train_loss", float("nan")))
        self._pause("published")
