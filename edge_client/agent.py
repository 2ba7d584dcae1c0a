"""The device agent: one loop that takes tasks, trains, sends client updates and settles them.

Lifecycle (docs/edge-client.md has the sequence diagram):

1. connect (MQTT 5 persistent session keyed by the device id, or 3.1.1), with a retained
   last will ``Status(online=False)`` on ``fedmq/F/status/D``; publish the retained
   ``Status(online=True, task, spec_hash, samples, software)``; subscribe to the device's
   task, receipt and transfer-request topics; tell systemd READY;
2. an update left in flight by a previous run is sent again (same bytes, same transfer
   id), and so is the last accepted one (the coordinator that accepted it may have died
   before its checkpoint): the coordinator's answer settles either;
3. for each task of a round not yet done: fetch the global model version it names (from
   the local cache when there), train (:func:`fedmq.fl.training.train_local`, in a
   worker thread so the main loop keeps pinging the watchdog), compress with error
   feedback, commit residual + update to disk (:class:`edge_client.state.DeviceState`),
   then publish the update as a chunked blob under ``fedmq/F/update/D/T``;
4. on the coordinator's Receipt: ``accepted`` commits; a rejection puts the sent update
   back into the residual. Transfer requests are answered by resending chunks. The
   coordinator is the one authority on whether a transfer was aggregated: it answers a
   resend of a transfer it already judged with the stored answer (from its database,
   across its restarts), so the device never rolls back on its own guess. With no receipt
   the whole update is sent again (same bytes, same transfer id): after
   ``receipt_timeout`` seconds, at once after every reconnect to the broker, at once when
   a task of a later round or a rerun of the same round arrives (the coordinator crashed
   and lost it), and at the round's deadline plus ``receipt_grace``. A rerun of a round
   whose update was already accepted sends that update again too (kept until the next
   update is committed), so the rerun aggregates exactly what the lost run had.
5. a global model that cannot be used (unreadable, non-finite, or training on it gives a
   non-finite update) skips the round, says so in the status and the log, and the agent
   goes on with the next task.

Only the thread running the agent's loop touches the durable state and the error-feedback
memory (:meth:`EdgeAgent.run`; or one :meth:`EdgeAgent.step` at a time, from whichever thread
the fleet simulator's stepper gives it: fleet/stepper.py); paho's callbacks only queue
messages (fedmq.transport.MqttLink).

Test hook (:mod:`fedmq.testhooks`, prefix ``FEDMQ_EDGE``): with ``FEDMQ_EDGE_TEST_PAUSE_AT``
set to ``fetching`` (task taken, global model not yet fetched), ``training`` (model
trained, nothing committed), ``publishing`` (update committed to disk, nothing published),
``published`` (update published, receipt not yet handled) or ``receipt`` (receipt
received, not yet committed or rolled back), optionally only in round
``FEDMQ_EDGE_TEST_PAUSE_ROUND``, the agent writes the point's name to the file
``FEDMQ_EDGE_TEST_PAUSE_FILE`` and waits there until that file is removed or the agent is
stopped, so that a test can kill it, or restart the broker, at that exact point. In secure
rounds, ``secagg_keys``, ``secagg_shares``, ``secagg_input`` (the masked input durable, not
published) and ``secagg_reveal`` stop it before that message goes out (edge_client.secure).
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
from edge_client.duplicate import TakeoverWatch
from edge_client.localdata import LocalData
from edge_client.metrics import AgentCollector, serve_agent_metrics
from edge_client.sdnotify import Notifier
from edge_client.secure import (ACTIVE_AFTER_DEADLINE_S, Pending, SecureDevice, clear_pending, load_pending,
                                save_pending)
from edge_client.scaffold import ScaffoldDevice
from edge_client.state import DeviceState, lock_state_dir
from fedmq import __version__, topics
from fedmq.codecs import decode
from fedmq.envelope import decode_update
from fedmq.chain import DeltaBlob, ModelChain
from fedmq.errors import FedmqError, NonFiniteError, SpecMismatchError, TransferError, TransportError, WireError
from fedmq.fl import downlink
from fedmq.fl.client import package_update, train_for_task
from fedmq.fl.downlink import params_sha256
from fedmq.fl.training import LocalResult
from fedmq.messages import ModelPointer, Receipt, Status, Task
from fedmq.metrics_http import MetricsServer
from fedmq.modelio import model_from_safetensors, model_to_safetensors
from fedmq.params import ParamSpec, flatten_params, load_params
from fedmq.tasks import get_task
from fedmq.sealing import load_public_key, pin_key, seal_update
from fedmq.testhooks import PauseHook
from fedmq.transport.flows import fetch_blob, fetch_model
from fedmq.transport import Link, Message, Will, open_link
from fedmq.transport.counting import LINK_BYTES_IN, LINK_BYTES_OUT, CountingLink
from fedmq.transport.sender import BlobSender
from fedmq.transport.settings import BrokerSettings

log = logging.getLogger(__name__)

PAUSE_POINTS = ("fetching", "training", "publishing", "published", "receipt", "secagg_keys", "secagg_shares",
                "secagg_input", "secagg_reveal")

#: Longest wait of the main loop between two looks at its clocks, seconds.
TICK = 1.0
#: Wait of the main loop while a secure round of this device runs, seconds (each of the
#: round's phases waits for it once).
SECURE_TICK = 0.02
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
                          session_expiry=cfg.session_expiry if cfg.protocol == "5" else 0,
                          failover_urls=cfg.broker_failover_urls)


def fetch_latest_onnx(cfg: EdgeConfig, timeout: float = 30.0) -> bytes:
    """The latest ONNX export of the global model from the broker (``fedmq/F/onnx/latest``
    and the retained blob it points to), fetched on a short-lived clean connection.

    It connects with the device's read-only companion account when the configuration
    names one (``predict_*`` options): the broker binds the client id to the user name,
    so a second connection under the device's own name would close the running agent's.

    Raises:
        TransferError: no export announced or not complete within ``timeout`` seconds.
        TransportError: the broker cannot be reached.
    """
    settings = broker_settings(cfg).with_(session_expiry=0, connect_timeout=timeout)
    if cfg.predict_username_file is not None:
        settings = settings.with_(username_file=str(cfg.predict_username_file),
                                  password_file=str(cfg.predict_password_file))
    if cfg.predict_tls_cert is not None:
        settings = settings.with_(cert_file=str(cfg.predict_tls_cert), key_file=str(cfg.predict_tls_key))
    if cfg.predict_username_file is None and cfg.predict_tls_cert is None:
        log.warning("no predict_* credentials in the configuration: fetching the model as device %r, which closes "
                    "a running agent's connection on a broker that binds client ids to user names (fedmq broker "
                    "add-device makes the companion account %s)", cfg.device_id, f"{cfg.device_id}.predict")
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
        takeovers: how takeovers of the connection are judged (edge_client.duplicate; the
            defaults when None: a third within 120 s backs off 30 s, doubling).

    Attributes:
        counters: ``rounds_trained``, ``updates_sent``, ``accepted``, ``rejected``,
            ``rolled_back``, ``resends``, ``repairs``, ``bad_messages``, ``late_tasks``,
            ``duplicate_id`` (reports and back-offs: another agent seems to use this id), ``bad_models``.
        instance: random id of this run, sent in every Status (tells two agents with one
            device id apart).

    Raises:
        ConfigError: unknown task. DataError: missing or corrupt data (names the path).
        StateError: corrupt state directory (names the path).
        ConfigError: ``coordinator_key`` is unreadable or not an X25519 public key.
        KeyPinError: ``coordinator_key`` differs from the key this device pinned, or is unset
            while one is pinned (fedmq.sealing.pin_key).
    """

    def __init__(self, cfg: EdgeConfig, *, link: Link | None = None, notifier: Notifier | None = None,
                 environ: Mapping[str, str] | None = None, takeovers: TakeoverWatch | None = None) -> None:
        env = os.environ if environ is None else environ
        self.cfg = cfg
        self.notifier = notifier if notifier is not None else Notifier(env)
        self._hook = PauseHook("FEDMQ_EDGE", PAUSE_POINTS, env)
        self._stop = threading.Event()
        torch.set_num_threads(cfg.torch_threads)
        self.task_def = get_task(cfg.task, where=cfg.where("task"))
        self.model = self.task_def.build_model(cfg.seed)
        self.spec = ParamSpec.from_module(self.model)
        self.local = LocalData(cfg.data, self.task_def, where=cfg.where("data"),
                               holdout_fraction=cfg.holdout_fraction, seed=cfg.seed)
        self.x, self.y, self.x_val, self.y_val = self.local.x, self.local.y, self.local.x_val, self.local.y_val
        #: Why this device refuses to train ("" while it does not), published in its status.
        self.refusal = ""
        self._state_lock = lock_state_dir(cfg.state_dir)
        self.state = DeviceState(cfg.state_dir)
        self.feedback = self.state.load_feedback(self.spec)
        #: Scaffold's control variate c_i and its residual (edge_client/scaffold.py; used when a task asks).
        self.scaffold = ScaffoldDevice(cfg.state_dir, self.spec, self.state)
        #: The coordinator's pinned public key: client updates are sealed to it (None: sent in the clear).
        self.coordinator_key = load_public_key(cfg.coordinator_key) if cfg.coordinator_key is not None else None
        pin_key(cfg.state_dir, self.coordinator_key, cfg.where("coordinator_key")
                + (f" ({cfg.coordinator_key})" if cfg.coordinator_key is not None else ""))
        self.counters: Counter[str] = Counter()
        self.instance = secrets.token_hex(6)
        self.takeovers = takeovers if takeovers is not None else TakeoverWatch()
        self.link = CountingLink(link if link is not None else open_link(broker_settings(cfg), client_id=cfg.device_id))
        self._reported = self.link.traffic.snapshot()
        self.sender: BlobSender | None = None
        self._last_ping = 0.0
        self._last_send = 0.0
        self._connects_seen = 0
        self._pending: Task | None = None
        self._tasks_seen: set[tuple[int, float]] = set()
        self._asked_after_deadline = False
        #: Called on the training worker after local training with (task, result); the fleet
        #: simulator (fleet/fleet.py) uses it for a device's compute speed and for dropout
        #: mid-training. None on real devices.
        self.pace: Callable[[Task, LocalResult], None] | None = None
        # Compressed downlink: the newest version chain seen, and the global model version
        # this device holds (float32 vector, apart from the model training changes).
        self._chain: ModelChain | None = None
        self._held: tuple[int, np.ndarray] | None = None
        self._metrics: MetricsServer | None = None
        # Secure rounds (edge_client.secure): their messages, handled between ticks and while
        # training; an input left unsettled by the last run is settled by the retained result.
        self._secure_inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
        left = load_pending(cfg.state_dir, self.spec.size)
        if left is not None:
            self.feedback.residual = left[1]
        self.secure = SecureDevice(cfg.federation, cfg.device_id, self.link, size=self.spec.size,
                                   settle=self._settle_secure, sent=self._secure_sent,
                                   pending=left[0] if left is not None else None, refused=self.counters,
                                   pause=self._pause)
        self._secure_task: Task | None = None

    # -- helpers --------------------------------------------------------------------------

    def _status(self, online: bool) -> bytes:
        return Status(device=self.cfg.device_id, online=online, task=self.task_def.name, spec_hash=self.spec.hash,
                      samples=len(self.y), software=f"fedmq-edge {__version__}", ts=time.time(),
                      instance=self.instance, refusal=self.refusal).to_bytes()

    def _healthy_tick(self, worker: _Worker | None = None, limit: float = math.inf) -> None:
        """Ping the watchdog if the link is up and the worker (if any) is within its time
        limit; republish the online status after a reconnect (the broker published our last
        will when the link dropped)."""
        link = self.link
        self._drain_secure()
        healthy = link.connected and (worker is None or time.monotonic() - worker.started <= limit)
        interval = self.notifier.watchdog_interval
        if healthy and interval is not None and time.monotonic() - self._last_ping >= interval:
            self.notifier.watchdog()
            self._last_ping = time.monotonic()
        if link.connected and link.connects != self._connects_seen:
            self._connects_seen = link.connects
            link.publish(topics.status(self.cfg.federation, self.cfg.device_id), self._status(True), retain=True)
            if self.state.record.inflight is not None and worker is None:
                # The broker may have restarted and lost what we sent: ask again now
                # instead of after receipt_timeout.
                self.counters["resends"] += 1
                self._send_inflight()

    def _in_worker(self, fn: Callable[[], T], limit: float, stop: threading.Event) -> T | None:
        """Run ``fn`` off the main thread, pinging the watchdog while it stays within
        ``limit`` seconds. Returns None when stop was requested first; re-raises its error."""
        worker = _Worker(fn)
        while True:
            outcome = worker.wait(min(self._tick(), self.notifier.watchdog_interval or TICK))
            if outcome is not None:
                ok, value = outcome
                if ok:
                    return value
                raise value
            if stop.is_set():
                return None
            self._healthy_tick(worker, limit)

    def _pause(self, point: str, round_: int) -> None:
        self._hook(point, round_, self._stop.is_set)

    def _sent_vector(self, data: bytes) -> np.ndarray:
        update = decode_update(data, self.spec)
        return decode(update.codec, update.payload, self.spec)

    def _base(self, transfer_id: str) -> str:
        return topics.update_base(self.cfg.federation, self.cfg.device_id, transfer_id)

    # -- the loop -------------------------------------------------------------------------

    def run(self, stop: threading.Event | None = None) -> None:
        """Connect and serve tasks until ``stop`` is set (SIGTERM / SIGINT in the CLI):
        :meth:`start`, :meth:`step` until stopped, :meth:`finish`.

        Raises:
            TransportError: the broker refused the connection or cannot be reached at start.
            StateError: the state directory cannot be written.
        """
        stop = stop if stop is not None else threading.Event()
        self.start(stop)
        try:
            while not stop.is_set():
                self.step(stop, min(self._tick(), self.notifier.watchdog_interval or TICK))
        finally:
            self.finish()

    def start(self, stop: threading.Event) -> None:
        """Connect, subscribe, publish the online status and resend what the last run left
        in flight; then call :meth:`step` until ``stop`` is set and :meth:`finish` once.
        (The fleet simulator drives thousands of agents this way from a few threads.)

        Raises:
            TransportError: the broker refused the connection or cannot be reached.
            StateError: the state directory cannot be written.
        """
        self._stop = stop
        cfg = self.cfg
        fed, dev = cfg.federation, cfg.device_id
        link = self.link
        link.set_will(Will(topics.status(fed, dev), self._status(False), qos=1, retain=True))
        self.sender = BlobSender(link)
        self._metrics = self._serve_metrics()
        try:
            link.connect()
        except BaseException:
            if self._metrics is not None:
                self._metrics.close()
                self._metrics = None
            raise
        try:
            self._connects_seen = link.connects
            # A follower keeps the version chain subscribed; the others read it when a task
            # needs it (each chain update is a few KB that a device not selected has no use for).
            link.subscribe(([topics.model_chain(fed)] if cfg.model_follow else [])
                           + [topics.task(fed, dev), topics.receipt(fed, dev), topics.transfer_requests(fed, dev),
                              topics.model_latest(fed)], qos=1)
            link.subscribe(topics.secagg_down(fed, dev), qos=1, inbox=self._secure_inbox)
            link.publish_wait(topics.status(fed, dev), self._status(True), retain=True)
            self.notifier.ready(f"online, last round {self.state.record.last_round}")
            log.info("device %s online in federation %s (task %s, %d samples, spec %s, state %s)", dev, fed,
                     self.task_def.name, len(self.y), self.spec.hash, cfg.state_dir)
            if self.state.record.inflight is not None:
                # A receipt the broker kept in our persistent session settles the update
                # without sending it again.
                self._drain()
            if self.state.record.inflight is None and self.state.record.settled is not None:
                # The last accepted update may have been accepted by a coordinator that died
                # before its checkpoint, and rerun while we were away: ask (the coordinator
                # answers with what its database says) instead of assuming it was aggregated.
                self.state.reopen(self.state.record.settled.deadline)
            if self.state.record.inflight is not None:
                self._resume_inflight()
        except BaseException:
            self.finish()
            raise

    def step(self, stop: threading.Event, wait: float) -> bool:
        """One turn of the agent's loop: clocks (watchdog, resends, takeovers), then a pending
        task's round, or one message (waiting up to ``wait`` seconds for it; 0: none).

        Returns: True when it did something (more may be waiting), False when idle.
        Raises: as :meth:`run` (SpecMismatchError ends the run).
        """
        self._check_takeovers(stop)
        self._healthy_tick()
        self._check_inflight()
        if self._pending is not None and self.state.record.inflight is None:
            task, self._pending = self._pending, None
            if self._wants(task):
                self._run_round(task, stop)
            return True
        if self._should_follow():
            self._follow(stop)
            return True
        try:
            msg = self.link.inbox.get(timeout=wait) if wait > 0 else self.link.inbox.get_nowait()
        except queue.Empty:
            return False
        self._handle(msg)
        return True

    def finish(self) -> None:
        """Publish the offline status (when connected) and close the link; after :meth:`start`."""
        fed, dev = self.cfg.federation, self.cfg.device_id
        link = self.link
        self.notifier.stopping()
        if link.connected:
            try:
                link.publish_wait(topics.status(fed, dev), self._status(False), retain=True, timeout=5.0)
            except TransportError as exc:
                log.warning("offline status not acknowledged: %s", exc)
        link.close()
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None

    def _serve_metrics(self) -> MetricsServer | None:
        """The Prometheus endpoint when ``metrics_port`` is set (edge_client.metrics)."""
        cfg = self.cfg
        if not cfg.metrics_port:
            return None
        collector = AgentCollector(self.counters, lambda: self.link.connected, lambda: self.state.record.last_round,
                                   lambda: self.state.record.inflight is not None)
        server = serve_agent_metrics(collector, cfg.metrics_address, cfg.metrics_port)
        log.info("metrics on %s", server.url)
        return server

    def _check_takeovers(self, stop: threading.Event) -> None:
        """Report the broker closing this connection again and again right after accepting it
        (edge_client.duplicate): another agent has this device id; back off so that it runs.

        Raises:
            TransportError: the broker cannot be reached again after the back-off.
        """
        link = self.link
        verdict = self.takeovers.observe(link.taken_over + link.short_lived, time.monotonic())
        if verdict is None:
            return
        dev = self.cfg.device_id
        self.counters["duplicate_id"] += 1
        if verdict == "report":
            log.error("device %s: the broker keeps closing this connection right after accepting it: most likely "
                      "another agent is configured with device id %r (the broker closes the older of two "
                      "connections with one client id, in turn); give every device its own device_id and broker "
                      "account", dev, dev)
            return
        pause = self.takeovers.backoff_s()
        log.error("device %s: device id in use by another agent (connection closed 3 times within %.0f s): backing "
                  "off %.0f s so that the other one runs, then connecting again; give every device its own "
                  "device_id and broker account (this agent is instance %s)", dev, self.takeovers.window_s, pause,
                  self.instance)
        self.notifier.status(f"backing off {pause:.0f} s: device id {dev} in use by another agent")
        self.link.close()
        end = time.monotonic() + pause
        while not stop.is_set() and time.monotonic() < end:
            stop.wait(min(TICK, end - time.monotonic()))
            if self.notifier.watchdog_interval is not None:
                self.notifier.watchdog()  # waiting on purpose, not hung
        if not stop.is_set():
            self.link.connect()

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
        if msg.topic == topics.model_latest(fed):
            try:
                pointer = ModelPointer.from_bytes(msg.payload)
            except WireError as exc:
                self.counters["bad_messages"] += 1
                log.warning("malformed model pointer on %s ignored: %s", msg.topic, exc)
                return
            self._on_model_pointer(pointer)  # raises SpecMismatchError: the run ends
            return
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

    def _refuse(self, reason: str) -> None:
        """Publish the reason this device does not train in its retained status."""
        if reason != self.refusal:
            self.refusal = reason
            log.error("refusing to train: %s", reason)
            assert self.link is not None
            self.link.publish(topics.status(self.cfg.federation, self.cfg.device_id), self._status(True), retain=True)

    def _on_model_pointer(self, pointer: ModelPointer) -> None:
        """The federation's global model is for another ParamSpec: say why in the status and
        stop (exit code 2): a device with the wrong task must not take part."""
        if pointer.spec_hash == self.spec.hash:
            return
        reason = (f"{self.cfg.where('task')}: task {self.task_def.name!r} has ParamSpec {self.spec.hash}, the "
                  f"federation's global model ({topics.model_latest(self.cfg.federation)}) has {pointer.spec_hash}; "
                  "expected the coordinator's task")
        self._refuse(reason)
        raise SpecMismatchError(reason)

    def _on_task(self, task: Task) -> None:
        cfg = self.cfg
        if task.federation != cfg.federation or task.device != cfg.device_id:
            self.counters["bad_messages"] += 1
            log.warning("task for %s/%s on this device's topic ignored", task.federation, task.device)
            return
        rec = self.state.record
        inflight, settled = rec.inflight, rec.settled
        if task.secure_aggregation and task.round > rec.last_round:
            self._secure_task = task  # answer its phases promptly (SECURE_TICK)
        if inflight is None:
            self._seen_task(task)
        if inflight is not None:
            if task.round < inflight.round:
                log.debug("task for round %d ignored: an update for round %d is in flight", task.round,
                          inflight.round)
                return
            if task.round == inflight.round and task.deadline <= inflight.deadline:
                # Our round's task seen again: delivered after a reconnect, or published again
                # by a coordinator restoring its retained state after a broker restart. Either
                # way the coordinator may never have seen our update: ask again now. (Its first
                # sight after our own start follows the resend the start made.)
                if self._seen_task(task):
                    self.counters["resends"] += 1
                    self._send_inflight()
                return
            if task.round == inflight.round and task.model_version == inflight.base_version:
                # A rerun of our round (the coordinator crashed and lost what we sent).
                log.info("round %d is being rerun: sending the update in flight again", task.round)
                self.state.reopen(task.deadline)
            else:
                # A later round began without our receipt: ask the coordinator (it answers a
                # resend with what it decided) before anything is rolled back; the new task
                # waits until the answer settles the update.
                log.info("round %d began without a receipt for round %d: asking again", task.round,
                         inflight.round)
                self._keep_pending(task)
            self.counters["resends"] += 1
            self._send_inflight()
            return
        if settled is not None and task.round == settled.round and task.deadline > rec.last_deadline \
                and task.model_version == settled.base_version:
            # Same round, later deadline: the coordinator crashed before it checkpointed the
            # round and lost the update it had accepted from us. Send the same bytes again.
            log.info("round %d is being rerun by the coordinator: sending its accepted update again", task.round)
            self.state.reopen(task.deadline)
            self.counters["resends"] += 1
            self._send_inflight()
            return
        if not self._wants(task):
            log.debug("task for round %d ignored: already done", task.round)
            return
        if task.round == rec.last_round:
            log.info("round %d is being rerun by the coordinator: training again", task.round)
        self._keep_pending(task)

    def _seen_task(self, task: Task) -> bool:
        """True when this very task (round, deadline) arrived before in this run."""
        key = (task.round, task.deadline)
        seen = key in self._tasks_seen
        if len(self._tasks_seen) >= 64:
            self._tasks_seen.clear()
        self._tasks_seen.add(key)
        return seen

    def _wants(self, task: Task) -> bool:
        """True when ``task`` is for a round this device has not done (or a rerun of its last)."""
        rec = self.state.record
        return task.round > rec.last_round or (task.round == rec.last_round and task.deadline > rec.last_deadline)

    def _keep_pending(self, task: Task) -> None:
        if self._pending is None or (task.round, task.deadline) >= (self._pending.round, self._pending.deadline):
            self._pending = task

    def _on_receipt(self, receipt: Receipt) -> None:
        inflight = self.state.record.inflight
        if receipt.device != self.cfg.device_id or inflight is None or receipt.transfer_id != inflight.transfer_id:
            log.info("receipt for round %d (%s) does not match the update in flight: ignored", receipt.round,
                     receipt.transfer_id)
            return
        if receipt.round != inflight.round:
            # The transfer id (random, one per update) names the update; a coordinator that
            # names another round (one from before issue 27, or its database's answer from
            # then) still answers this update, and ignoring it would keep it in flight forever.
            log.warning("receipt for transfer %s names round %d, the update is for round %d: settled on it",
                        receipt.transfer_id, receipt.round, inflight.round)
        self._pause("receipt", inflight.round)
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
            if receipt.reason == "bad_seal":
                log.error("round %d: the coordinator could not open this device's sealed update: it holds another "
                          "key than the one pinned here (%s), or the update was altered on the way; if its key "
                          "changed, provision the device with the current one", inflight.round,
                          self.cfg.coordinator_key)
            self._rollback(receipt.reason or "rejected")
        self.notifier.status(f"idle, last round {self.state.record.last_round}")

    # -- secure rounds (edge_client.secure) ----------------------------------------------------

    def _tick(self) -> float:
        """The main loop's wait: short while a secure round of this device runs (its messages
        come on their own inbox, looked at once per wait), TICK otherwise."""
        task = self._secure_task
        waiting = task is not None and time.time() < task.deadline + ACTIVE_AFTER_DEADLINE_S
        return SECURE_TICK if waiting or self.secure.active else TICK

    def _drain_secure(self) -> None:
        while True:
            try:
                msg = self._secure_inbox.get_nowait()
            except queue.Empty:
                return
            if msg.payload:
                self.secure.handle(msg.payload)

    def _secure_input(self, task: Task, result: LocalResult) -> None:
        """Hand the residual plus the update to the secure round; until its result the whole
        of it is in the residual (the round is done: no second update for it)."""
        vector = self.feedback.residual + np.asarray(result.update, dtype=np.float32)
        if not np.isfinite(vector).all():
            self._skip_bad_model(task, "training on it gave a non-finite update")
            return
        self.feedback.residual = vector.copy()
        self.state.save_residual(self.feedback, task.round, task.deadline)
        self._secure_task = task
        self._drain_secure()
        self.secure.provide(task.round, vector)
        self.counters["updates_sent"] += 1

    def _secure_sent(self, pending: Pending) -> None:
        """The masked input is about to go out: durably, the residual without it."""
        residual = self.feedback.residual - pending.sent
        save_pending(self.cfg.state_dir, pending, residual)
        self.feedback.residual = residual
        task = self._secure_task
        self.state.save_residual(self.feedback, pending.round, task.deadline if task is not None else 0.0)

    def _settle_secure(self, pending: Pending, in_sum: bool) -> None:
        self._secure_task = None
        if in_sum:
            self.counters["accepted"] += 1
        else:
            self.feedback.rollback(pending.sent)
            self.counters["rolled_back"] += 1
        self.state.save_residual(self.feedback, pending.round, self.state.record.last_deadline)
        clear_pending(self.cfg.state_dir)

    def _rollback(self, reason: str) -> None:
        self.state.rollback(self.feedback, self._sent_vector(self.state.read_inflight()), reason)
        self.counters["rolled_back"] += 1

    def _check_inflight(self) -> None:
        inflight = self.state.record.inflight
        if inflight is None:
            return
        past = time.time() > inflight.deadline + self.cfg.receipt_grace
        if past and not self._asked_after_deadline:
            # No receipt by the deadline: ask once now. Rolling back on a guess would put an
            # update the coordinator aggregated (its receipt lost) back into the residual.
            log.warning("round %d: no receipt by the deadline: asking the coordinator again", inflight.round)
            self._asked_after_deadline = True
            self.counters["resends"] += 1
            self._send_inflight()
        elif time.monotonic() - self._last_send >= self.cfg.receipt_timeout:
            self.counters["resends"] += 1
            self._send_inflight()

    def _resume_inflight(self) -> None:
        inflight = self.state.record.inflight
        assert inflight is not None
        log.info("round %d: sending the update left in flight by the last run again (transfer %s)",
                 inflight.round, inflight.transfer_id)
        self._send_inflight()

    def _send_inflight(self) -> None:
        """(Re)publish the committed update: the same bytes under the same transfer id."""
        inflight = self.state.record.inflight
        assert inflight is not None and self.sender is not None
        self._last_send = time.monotonic()
        if time.time() <= inflight.deadline + self.cfg.receipt_grace:
            self._asked_after_deadline = False
        try:
            # The manifest names the round, so a refusal decided before the blob is assembled
            # still names this update's round (and settles it).
            self.sender.send(self._base(inflight.transfer_id), self.state.read_wire(), timeout=SEND_TIMEOUT,
                             round_=inflight.round)
        except TransportError as exc:
            log.warning("round %d: publishing the update failed (%s); retried in %.0f s", inflight.round, exc,
                        self.cfg.receipt_timeout)

    # -- one round ------------------------------------------------------------------------

    def _skip_bad_model(self, task: Task, why: str) -> None:
        """Skip a round whose global model cannot be used; the agent keeps serving."""
        self.counters["bad_models"] += 1
        log.error("round %d: global model %d unusable: %s: round skipped", task.round, task.model_version, why)
        self.notifier.status(f"round {task.round}: global model {task.model_version} unusable ({why}); skipped")
        self.state.finish_round(task.round, task.deadline)

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
        deadline = time.monotonic() + timeout

        def fetch() -> Any:
            while True:
                try:
                    return fetch_blob(self.link, base, max(1.0, deadline - time.monotonic()))
                except TransferError:
                    raise
                except TransportError as exc:
                    # The link dropped mid-fetch (a broker restart): fetch again once it is back.
                    if time.monotonic() >= deadline or not self.link.wait_connected(deadline - time.monotonic()):
                        raise
                    log.info("global model %d: fetch interrupted (%s); fetching again", version, exc)

        blob = self._in_worker(fetch, timeout + 30.0, stop)
        if blob is None:
            return False
        model_from_safetensors(blob.data, self.model, self.spec)
        self.state.cache_model(version, blob.data)
        return True

    def _train(self, task: Task, cap: float) -> LocalResult:
        correction = self.scaffold.correction(task, self.link, self.cfg.federation, self.cfg.fetch_timeout) \
            if task.plan.algorithm == "scaffold" else None
        result = train_for_task(self.model, self.x, self.y, task, seed=self.cfg.seed, max_seconds=cap,
                                x_val=self.x_val, y_val=self.y_val, task_def=self.task_def, correction=correction)
        if self.pace is not None:
            self.pace(task, result)
        return result

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
            self._refuse(f"round {task.round}: the task is for ParamSpec {task.spec_hash}, this device's task "
                         f"{self.task_def.name!r} ({cfg.where('task')}) has {self.spec.hash}")
            self.state.finish_round(task.round, task.deadline)
            return
        if time.time() >= task.deadline:
            self.counters["late_tasks"] += 1
            log.warning("round %d: deadline already passed: skipped", task.round)
            self.state.finish_round(task.round, task.deadline)
            return
        self._pause("fetching", task.round)
        self.notifier.status(f"round {task.round}: fetching model {task.model_version}")
        try:
            if not self._load_global(task.model_version, stop, task.model_sha256):
                return
        except FedmqError as exc:
            if stop.is_set():
                # A stop (SIGTERM) cut the fetch short: the round is not done, the next start
                # answers its task (still retained) if the deadline allows.
                log.info("round %d: stopped while fetching global model %d", task.round, task.model_version)
                return
            log.error("round %d: global model %d unavailable (%s): skipped", task.round, task.model_version, exc)
            self.state.finish_round(task.round, task.deadline)
            return
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            self._skip_bad_model(task, "the global model has NaN or Inf parameters")
            return

        if self.local.refresh():
            self.x, self.y, self.x_val, self.y_val = self.local.x, self.local.y, self.local.x_val, self.local.y_val
            self.link.publish(topics.status(cfg.federation, cfg.device_id), self._status(True), retain=True)
        plan = task.plan
        cap = min(c for c in (plan.max_seconds, cfg.max_train_seconds) if c > 0)
        self.notifier.status(f"round {task.round}: training")
        try:
            result: LocalResult | None = self._in_worker(lambda: self._train(task, cap), 2 * cap + 60.0, stop)
        except FedmqError as exc:
            self._skip_bad_model(task, f"local training failed ({exc})")
            return
        if result is None:
            return
        self.counters["rounds_trained"] += 1
        self._pause("training", task.round)

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
        if task.secure_aggregation:
            self._secure_input(task, result)
            return
        try:
            control = self.scaffold.package(task, result, cfg.seed) if plan.algorithm == "scaffold" else b""
            packaged = package_update(result, task, federation=cfg.federation, device=cfg.device_id,
                                      spec=self.spec, feedback=self.feedback, seed=cfg.seed, control=control)
        except NonFiniteError as exc:
            # package_update leaves the residual unchanged when it refuses.
            self._skip_bad_model(task, f"training on it gave a non-finite update ({exc})")
            return
        data = packaged.data
        transfer_id = secrets.token_hex(16)
        sealed = None
        if self.coordinator_key is not None:
            sealed = seal_update(data, self.coordinator_key, federation=cfg.federation, device=cfg.device_id,
                                 transfer_id=transfer_id)
        if control:
            self.scaffold.save(transfer_id)  # its ledger entry, committed next, says which half is in force
        inflight = self.state.begin_update(self.feedback, data, round=task.round, transfer_id=transfer_id,
                                           base_version=task.model_version, deadline=task.deadline,
                                           with_feedback=plan.error_feedback, sealed=sealed)
        self._pause("publishing", task.round)
        self.notifier.status(f"round {task.round}: sending update ({len(data if sealed is None else sealed)} bytes"
                             f"{', sealed' if sealed is not None else ''})")
        self._send_inflight()
        self.counters["updates_sent"] += 1
        log.info("round %d: update sent (%d bytes, transfer %s, %d steps in %.2f s, train loss %.4f)",
                 task.round, len(data), inflight.transfer_id, result.steps, result.seconds,
                 result.metrics.get("train_loss", float("nan")))
        self._pause("published", task.round)
