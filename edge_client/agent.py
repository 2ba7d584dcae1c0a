"""The device agent: one loop that takes tasks, trains, sends client updates and settles them.

The agent is the loop over its parts, each built whole by its constructor: the connection
(edge_client.connection: link, blob sender, status), the clocks (edge_client.loop: watchdog,
reconnects, takeover back-off, work off the loop thread), the settlement of client updates
(edge_client.settlement), the global model (edge_client.model_sync), the round's training and
client update (edge_client.trainer) and secure rounds (edge_client.secure_rounds).

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
import os
import queue
import secrets
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import torch

from edge_client.config import EdgeConfig
from edge_client.connection import Connection
from edge_client.duplicate import TakeoverWatch
from edge_client.localdata import LocalData
from edge_client.loop import Heartbeat
from edge_client.metrics import AgentCollector, serve_agent_metrics
from edge_client.model_sync import ModelSync
from edge_client.scaffold import ScaffoldDevice
from edge_client.sdnotify import Notifier
from edge_client.secure_rounds import SecureRounds
from edge_client.settlement import Settlement
from edge_client.state import DeviceState, lock_state_dir
from edge_client.trainer import Trainer
from fedmq.wire import topics
from fedmq.errors import SpecMismatchError, TransportError, WireError
from fedmq.fl.training import LocalResult
from fedmq.wire.messages import ModelPointer, Receipt, RoundTask
from fedmq.metrics_http import MetricsServer
from fedmq.model.params import ParamSpec
from fedmq.security.sealing import load_public_key, pin_key
from fedmq.tasks import get_task
from fedmq.testhooks import PauseHook
from fedmq.transport import Link, Message, open_link
from fedmq.transport.flows import fetch_model
from fedmq.transport.settings import BrokerSettings

log = logging.getLogger(__name__)

PAUSE_POINTS = ("fetching", "training", "publishing", "published", "receipt", "secagg_keys", "secagg_shares",
                "secagg_input", "secagg_reveal")


def broker_settings(cfg: EdgeConfig) -> BrokerSettings:
    """Transport settings of an edge configuration (persistent session with MQTT 5)."""
    return cfg.broker


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


class EdgeAgent:
    """The device agent for one configuration.

    Construction loads the task's model, the local data and the durable state, and builds
    every part (no network).

    Args:
        cfg: validated configuration.
        link: the connection to the broker, not yet connected (default:
            :func:`fedmq.transport.open_link` for ``cfg.broker.url``, chosen by the URL's
            scheme, with the device id as client id). The agent sets its last will on it.
        notifier: systemd notifier (from the environment when None).
        environ: environment for the test hook (``os.environ`` when None).
        takeovers: how takeovers of the connection are judged (edge_client.duplicate; the
            defaults when None: a third within 120 s backs off 30 s, doubling).

    Attributes:
        counters: ``rounds_trained``, ``updates_sent``, ``accepted``, ``rejected``,
            ``rolled_back``, ``resends``, ``repairs``, ``bad_messages``, ``late_tasks``,
            ``duplicate_id`` (reports and back-offs: another agent seems to use this id), ``bad_models``.
        state: the durable state (edge_client.state).
        conn, heartbeat, settlement, secure, sync, trainer: the parts (see the module docstring).

    Raises:
        ConfigError: unknown task. DataError: missing or corrupt data (names the path).
        StateError: corrupt state directory (names the path).
        ConfigError: ``coordinator_key`` is unreadable or not an X25519 public key.
        KeyPinError: ``coordinator_key`` differs from the key this device pinned, or is unset
            while one is pinned (fedmq.security.sealing.pin_key).
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
        local = LocalData(cfg.data, self.task_def, where=cfg.where("data"), holdout_fraction=cfg.holdout_fraction,
                          seed=cfg.seed)
        self._state_lock = lock_state_dir(cfg.state_dir)
        self.state = DeviceState(cfg.state_dir)
        feedback = self.state.load_feedback(self.spec)
        coordinator_key = load_public_key(cfg.coordinator_key) if cfg.coordinator_key is not None else None
        pin_key(cfg.state_dir, coordinator_key, cfg.where("coordinator_key")
                + (f" ({cfg.coordinator_key})" if cfg.coordinator_key is not None else ""))
        self.counters: Counter[str] = Counter()
        self.conn = Connection(cfg, link if link is not None else open_link(broker_settings(cfg),
                                                                             client_id=cfg.device_id),
                               task_name=self.task_def.name, spec=self.spec, local=local)
        self.settlement = Settlement(cfg, self.conn, self.state, feedback, self.spec, self.counters, self.notifier,
                                     self._pause)
        self.secure = SecureRounds(cfg, self.conn, self.state, feedback, size=self.spec.size,
                                   counters=self.counters, pause=self._pause)
        self.heartbeat = Heartbeat(self.conn, self.notifier, self.settlement, self.secure,
                                   takeovers if takeovers is not None else TakeoverWatch(), self.counters,
                                   cfg.device_id)
        self.sync = ModelSync(cfg, self.conn, self.state, model=self.model, spec=self.spec, task_def=self.task_def,
                              counters=self.counters, heartbeat=self.heartbeat, handle=self._handle)
        self.trainer = Trainer(cfg, self.conn, self.state, feedback, model=self.model, spec=self.spec,
                               task_def=self.task_def, local=local, coordinator_key=coordinator_key,
                               heartbeat=self.heartbeat, sync=self.sync, settlement=self.settlement,
                               secure=self.secure, scaffold=ScaffoldDevice(cfg.state_dir, self.spec, self.state),
                               counters=self.counters, notifier=self.notifier, pause=self._pause)
        #: The Prometheus endpoint of a session (``metrics_port``), None between sessions.
        self._metrics: MetricsServer | None = None

    @property
    def link(self) -> Any:
        """The link of the current session (a :class:`fedmq.transport.counting.CountingLink`);
        set a new one between sessions (the fleet simulator does, fleet/fleet.py)."""
        return self.conn.link

    @link.setter
    def link(self, link: Any) -> None:
        self.conn.replace(link)

    @property
    def pace(self) -> Callable[[RoundTask, LocalResult], None] | None:
        """Called after local training, on the training worker (:attr:`Trainer.pace`)."""
        return self.trainer.pace

    @pace.setter
    def pace(self, pace: Callable[[RoundTask, LocalResult], None] | None) -> None:
        self.trainer.pace = pace

    @property
    def instance(self) -> str:
        """Random id of this run, sent in every Status (tells two agents with one device id apart)."""
        return self.conn.instance

    @property
    def takeovers(self) -> TakeoverWatch:
        """How takeovers of the connection are judged (edge_client.duplicate)."""
        return self.heartbeat.takeovers

    def _pause(self, point: str, round_: int) -> None:
        self._hook(point, round_, self._stop.is_set)

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
                self.step(stop, self.heartbeat.wait_s())
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
        self.conn.open_session()
        link = self.conn.link
        self._metrics = self._serve_metrics()
        try:
            link.connect()
        except BaseException:
            if self._metrics is not None:
                self._metrics.close()
                self._metrics = None
            raise
        try:
            self.heartbeat.connected()
            # A follower keeps the version chain subscribed; the others read it when a task
            # needs it (each chain update is a few KB that a device not selected has no use for).
            link.subscribe(([topics.model_chain(fed)] if cfg.model_follow else [])
                           + [topics.task(fed, dev), topics.receipt(fed, dev), topics.transfer_requests(fed, dev),
                              topics.model_latest(fed)], qos=1)
            link.subscribe(topics.secagg_down(fed, dev), qos=1, inbox=self.secure.inbox)
            link.publish_wait(topics.status(fed, dev), self.conn.status(True), retain=True)
            self.notifier.ready(f"online, last round {self.state.record.last_round}")
            log.info("device %s online in federation %s (task %s, %d samples, spec %s, state %s)", dev, fed,
                     self.task_def.name, len(self.conn.local.y), self.spec.hash, cfg.state_dir)
            if self.state.record.inflight is not None:
                # A receipt the broker kept in our persistent session settles the update
                # without sending it again.
                self._drain()
            self.settlement.resume()
        except BaseException:
            self.finish()
            raise

    def step(self, stop: threading.Event, wait: float) -> bool:
        """One turn of the agent's loop: clocks (watchdog, resends, takeovers), then a pending
        task's round, or one message (waiting up to ``wait`` seconds for it; 0: none).

        Returns: True when it did something (more may be waiting), False when idle.
        Raises: as :meth:`run` (SpecMismatchError ends the run).
        """
        self.heartbeat.check_takeovers(stop)
        self.heartbeat.tick()
        self.settlement.check()
        task = self.settlement.take_pending()
        if task is not None:
            if self.settlement.wants(task):
                self.trainer.run_round(task, stop)
            return True
        chain = self.sync.to_follow()
        if chain is not None:
            self.sync.follow(chain, stop)
            return True
        link = self.conn.link
        try:
            msg = link.inbox.get(timeout=wait) if wait > 0 else link.inbox.get_nowait()
        except queue.Empty:
            return False
        self._handle(msg)
        return True

    def finish(self) -> None:
        """Publish the offline status (when connected) and close the link; after :meth:`start`."""
        fed, dev = self.cfg.federation, self.cfg.device_id
        link = self.conn.link
        self.notifier.stopping()
        if link.connected:
            try:
                link.publish_wait(topics.status(fed, dev), self.conn.status(False), retain=True, timeout=5.0)
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
        collector = AgentCollector(self.counters, lambda: self.conn.link.connected,
                                   lambda: self.state.record.last_round,
                                   lambda: self.state.record.inflight is not None)
        server = serve_agent_metrics(collector, cfg.metrics_address, cfg.metrics_port)
        log.info("metrics on %s", server.url)
        return server

    # -- messages -------------------------------------------------------------------------

    def _drain(self) -> None:
        """Handle every message already received, without waiting."""
        while True:
            try:
                msg = self.conn.link.inbox.get_nowait()
            except queue.Empty:
                return
            self._handle(msg)

    def _handle(self, msg: Message) -> None:
        """Route one message of the inbox to the part it is for; a malformed one is logged and
        counted (``bad_messages``). Raises SpecMismatchError (the run ends)."""
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
                self._on_task(RoundTask.from_bytes(msg.payload))
            elif msg.topic == topics.receipt(fed, dev):
                self.settlement.on_receipt(Receipt.from_bytes(msg.payload))
            elif msg.topic == topics.model_chain(fed):
                self.sync.on_chain(msg.payload)
            elif msg.topic == topics.transfer_requests(fed, dev):
                self.settlement.on_transfer_request(msg.payload)
            else:
                log.debug("message on unexpected topic %s ignored", msg.topic)
        except WireError as exc:
            self.counters["bad_messages"] += 1
            log.warning("malformed message on %s ignored: %s", msg.topic, exc)
        except TransportError as exc:
            log.warning("answering %s failed: %s (the sender retries)", msg.topic, exc)

    def _on_model_pointer(self, pointer: ModelPointer) -> None:
        """The federation's global model is for another ParamSpec: say why in the status and
        stop (exit code 2): a device with the wrong task must not take part."""
        if pointer.spec_hash == self.spec.hash:
            return
        reason = (f"{self.cfg.where('task')}: task {self.task_def.name!r} has ParamSpec {self.spec.hash}, the "
                  f"federation's global model ({topics.model_latest(self.cfg.federation)}) has {pointer.spec_hash}; "
                  "expected the coordinator's task")
        self.conn.refuse(reason)
        raise SpecMismatchError(reason)

    def _on_task(self, task: RoundTask) -> None:
        cfg = self.cfg
        if task.federation != cfg.federation or task.device != cfg.device_id:
            self.counters["bad_messages"] += 1
            log.warning("task for %s/%s on this device's topic ignored", task.federation, task.device)
            return
        self.secure.expect(task, self.state.record.last_round)  # answer its phases promptly
        if self.secure.holds_input(task):
            log.info("secure round %d is being rerun by the coordinator: its input goes into the new attempt",
                     task.round)
            return
        self.settlement.on_task(task)
