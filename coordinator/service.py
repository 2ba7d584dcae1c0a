"""The rounds engine: one thread owns the round; MQTT callbacks only enqueue.

:class:`Coordinator` joins three separate pieces:

* who takes part: :mod:`fedmq.fl.sampling` (seeded uniform sampling, over-selection)
  and the round deadline, with :mod:`coordinator.presence` telling who is online;
* how updates are combined: :mod:`fedmq.fl.rounds` then
  :class:`fedmq.fl.aggregation.WeightedMean` (one model-sized accumulator);
* how the global model steps: :mod:`fedmq.fl.server_opt`.

A round ``r``: wait for ``round.min_devices`` eligible devices (after
``round.wait_for_devices_s``, ``min_updates`` are enough; with fewer no round opens);
select ``ceil(target * over_selection)`` of them with the generator of ``(seed, r)``;
send each a retained :class:`fedmq.messages.Task`; announce the round; accept client
updates until ``target`` are accepted, every selected device has answered, or the
deadline passes. With at least ``min_updates`` accepted the server optimizer steps and
a new global model version is published; otherwise the round fails and the model stays.
Every received update gets a :class:`fedmq.messages.Receipt`. Retained tasks are cleared
when the round closes. After every round the model, the optimizer state and the round's
record are checkpointed (coordinator.state) before anything is published, so a kill -9
at any instant resumes from the last finished round and reruns the one in flight.

Test hook (:mod:`fedmq.testhooks`, prefix ``FEDMQ_COORDINATOR``): the steps of
:data:`PAUSE_POINTS` are ``selection`` (devices selected, no task published),
``task_publish`` (the first task published, the others not yet), ``receipt`` (an update
judged, its receipt not sent), ``checkpoint_write`` (the round's checkpoint written to its
temporary file, not renamed), ``checkpoint_rename`` (checkpoint renamed, the database not
written), ``model_publish`` (round recorded, the new global model not yet published) and
``model_published`` (the new model published, the next round not selected); in secure
rounds ``secagg_keys``, ``secagg_shares``, ``secagg_input`` and ``secagg_reveal``
(coordinator.secure.SecureRound). The fault-injection suite kills or restarts a process there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from coordinator.config import CoordinatorConfig
from coordinator.evaluation import BackgroundEvaluator, Evaluation, evaluate_vector, gate_gradient, gate_loss
from coordinator.metrics import CoordinatorMetrics
from coordinator.phases import PhaseIO
from coordinator.presence import DeviceRegistry
from coordinator.privacy import PrivacyChecks, PrivacyGuard
from coordinator.scaffold import ScaffoldServer, fleet_size_of
from coordinator.secure import SecureOutcome, SecureRound, closed_round, plan_support
from coordinator.state import CHECKPOINT_NAME, Checkpoint, StateDB, load_checkpoint, save_checkpoint
from fedmq import topics
from fedmq.atomic import remove_stale_temporaries
from fedmq.data import load_split
from fedmq.envelope import max_update_bytes
from fedmq.sealing import SEAL_OVERHEAD, CoordinatorKey, SealError, is_sealed, load_or_create_key
from fedmq.errors import FedmqError, StateError, TransportError, WireError
from fedmq.chain import ChainEntry, DeltaBlob, ModelChain
from fedmq.atomic import atomic_write_bytes, atomic_write_text
from fedmq.fl import downlink
from fedmq.fl.downlink import params_sha256
from fedmq.fl.rounds import Accepted, ClosedRound, Outcome, Rejected, Repeat, RoundEngine, RoundRecord, UpdateChecks
from fedmq.fl.sampling import select_devices
from fedmq.messages import ModelPointer, Receipt, RoundAnnouncement, Status, Task
from fedmq.modelio import export_onnx, model_to_safetensors
from fedmq.secagg import messages as sm
from fedmq.params import ParamSpec, flatten_params, load_params
from fedmq.tasks import get_task
from fedmq.transport import Link, Message, open_link
from fedmq.transport.flows import clear_blob, publish_model, request_repairs
from fedmq.transport.receiver import BlobReceiver
from fedmq.testhooks import PauseHook
from fedmq.transport.counting import LINK_BYTES_IN, CountingLink
from fedmq.transport.sender import BlobSender
from fedmq.transport.wire import Manifest

log = logging.getLogger("fedmq.coordinator")

#: The steps every round passes (those of a plain round), then those only a secure round has.
ROUND_PAUSE_POINTS = ("selection", "task_publish", "receipt", "checkpoint_write", "checkpoint_rename", "model_publish",
                      "model_published", "publishing")
SECURE_PAUSE_POINTS = ("secagg_keys", "secagg_shares", "secagg_input", "secagg_reveal")
PAUSE_POINTS = ROUND_PAUSE_POINTS + SECURE_PAUSE_POINTS

#: Longest single wait on the inbox (seconds): bounds how late a stop request is seen.
_POLL_S = 0.2
#: Seconds between two "waiting for devices" log lines.
WAIT_LOG_INTERVAL_S = 30.0
#: Seconds the coordinator waits, when it stops, for its last publishes to be acknowledged.
FLUSH_TIMEOUT_S = 5.0

#: MQTT 5 session expiry of the coordinator's link when ``broker.session_expiry`` is 0,
#: seconds: the broker queues the client updates sent while the coordinator reconnects or
#: restarts, instead of dropping them.
SESSION_EXPIRY_S = 3600


def _manifest_round(payload: bytes) -> int | None:
    """The round a client update's manifest names, None when it names none or is unreadable."""
    try:
        return Manifest.from_bytes(payload).round
    except WireError:
        return None


def _support_ranking(gradient: np.ndarray | None, last_change: np.ndarray | None) -> np.ndarray | None:
    """What a secure round ranks its common support by: float32 ``(size,)``, or None (all drawn).

    Both signals, each scaled to unit norm, summed in magnitude: the gate-sample loss gradient
    reaches coordinates off the last support (the last change alone never leaves round 1's
    random draw: issue #26, the MNIST CNN), the last change is what the devices' own inputs
    did on the support (the gradient alone, on the coordinator's IID held-out data, lost
    14 pp on the digits MLP under Dirichlet(0.5); the sum lost 3). Either alone when the other
    is None."""
    if gradient is None or last_change is None:
        return last_change if gradient is None else gradient
    g = np.abs(gradient) / max(float(np.linalg.norm(gradient)), 1e-30)
    c = np.abs(last_change) / max(float(np.linalg.norm(last_change)), 1e-30)
    return (g + c).astype(np.float32)


@dataclass
class Progress:
    """One progress event for ``Coordinator.run(progress_callback=...)``.

    ``kind``: ``round_open`` (selection made), ``update`` (a client update answered),
    ``round_closed`` (``record`` set) or ``waiting`` (too few eligible devices yet).
    """

    kind: str
    round: int
    selected: int = 0
    target: int = 0
    accepted: int = 0
    rejected: int = 0
    deadline: float = 0.0
    online: int = 0
    record: RoundRecord | None = None


@dataclass
class RunResult:
    """What :meth:`Coordinator.run` returns.

    Attributes:
        records: one :class:`RoundRecord` per round finished by this run (a resumed run
            starts after the checkpoint's round).
        model: the final global model (torch module of the task, eval mode).
        vector: its trainable parameters, float32 (d,).
        version: its global model version.
        stopped: True when a stop request ended the run before ``rounds``.
    """

    records: list[RoundRecord]
    model: torch.nn.Module
    vector: np.ndarray
    version: int
    stopped: bool = False


class Coordinator:
    """The federated-learning coordinator of one federation.

    Args:
        config: validated configuration (coordinator.config.load_config).
        link: the connection to the broker, not yet connected (default:
            :func:`fedmq.transport.open_link` for ``config.broker``, chosen by the URL's
            scheme, with client id ``fedmq-coordinator-<federation>``).
        metrics: where the run's Prometheus metrics go (:class:`coordinator.metrics.CoordinatorMetrics`);
            the caller serves it. Default: a registry of this coordinator's own, served
            during :meth:`run` on ``config.metrics`` when its ``port`` is set.

    Use :meth:`run` from the thread that should own the rounds; :meth:`stop` from any
    thread (or a signal handler) ends the run after the current step, keeping the last
    checkpoint; the round in flight is rerun by the next start.

    Raises (from :meth:`run`):
        StateError: the state folder holds another task's checkpoint, or a corrupt one.
        TransportError: the broker cannot be reached at start.
    """

    def __init__(self, config: CoordinatorConfig, link: Link | None = None,
                 metrics: CoordinatorMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics if metrics is not None else CoordinatorMetrics()
        self._serve_metrics = metrics is None and config.metrics.port > 0
        self.fed = config.federation
        self.task = get_task(config.task, where=config.where("task"))
        self.model = self.task.build_model(config.seed)
        self.spec = ParamSpec.from_module(self.model)
        self.optimizer = config.server_optimizer.build()
        #: Differential privacy (``[privacy] enabled``; coordinator/privacy.py), else None.
        self.privacy = PrivacyGuard(config, self.spec) if config.privacy.enabled else None
        self.registry = DeviceRegistry(config.limits.max_devices)
        self.inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._eval_data: tuple[np.ndarray, np.ndarray] | None = None
        self._last_eval: tuple[float | None, float | None] = (None, None)
        self._evaluator: BackgroundEvaluator | None = None
        #: Closed rounds whose evaluation may still run, oldest first; each is reported
        #: (``round_closed``) once it and every older one are evaluated.
        self._pending: deque[tuple[RoundRecord, Future[Evaluation] | None]] = deque()
        self._records: list[RoundRecord] = []
        self._notify: Callable[[Progress], None] = lambda _p: None
        #: Selected devices of the open round that went offline before answering, with the
        #: time.monotonic() they did: dropped after ``round.drop_grace_s`` unless back online.
        self._gone: dict[str, float] = {}
        settings = config.broker
        if settings.protocol == "5" and settings.session_expiry == 0:
            settings = settings.with_(session_expiry=SESSION_EXPIRY_S)
        self.link = CountingLink(link if link is not None else open_link(settings,
                                                                         client_id=f"fedmq-coordinator-{self.fed}"))
        #: Retained round state (topic -> payload; b"" for a cleared task) to restore when
        #: the broker may have lost it; the published model is restored from ``_model_at``.
        self._retained: dict[str, bytes] = {}
        self._model_at: tuple[int, int] | None = None
        self._vector: np.ndarray | None = None
        self._connects_seen = 0
        #: Every rejection by reason, the ones outside a round and malformed messages included
        #: (flushed into the database's ``rejections`` table).
        self.rejections: Counter[str] = Counter()
        self._receiver_seen: Counter[str] = Counter()
        # Compressed downlink (fedmq.fl.downlink): the server residual, the params hash of the
        # published model, the newest snapshot, and the hash of version 0 (devices build it).
        self._residual: np.ndarray | None = None
        self._published_sha = ""
        self._onnx_published = False
        self._snapshot: ChainEntry | None = None
        self._origin_sha = params_sha256(flatten_params(self.model, self.spec))
        self.engine: RoundEngine | None = None
        #: Largest client-update blob admitted: the configured limit or the ParamSpec's own bound.
        self._update_limit = min(config.limits.max_update_bytes, max_update_bytes(self.spec) + SEAL_OVERHEAD)
        #: The key pair devices seal their client updates to (fedmq.sealing), kept in the state
        #: folder: loaded, or made on the first start, by :meth:`_resume`.
        self.seal_key: CoordinatorKey | None = None
        self.db: StateDB | None = None
        #: Secure rounds ([secure_aggregation] enabled): the policy, the last global model step
        #: (the common support derives from it) and the outcome of the round being closed.
        self.secure: SecureRound | None = None
        self._last_change: np.ndarray | None = None
        self._secure_outcome: SecureOutcome | None = None
        self._hook = PauseHook("FEDMQ_COORDINATOR", PAUSE_POINTS)
        #: Scaffold's server control variate (``[plan] algorithm = "scaffold"``; coordinator/scaffold.py).
        self.scaffold = ScaffoldServer(
            self.spec, self.fed, config.state_dir, config.downlink.codec_config(), window=config.downlink.window,
            snapshot_every=config.downlink.snapshot_every,
            fleet_size=lambda: fleet_size_of(self.registry.devices, self.task.name, self.spec.hash),
            norm_factor=config.limits.norm_bound_factor, norm_warmup=config.limits.norm_bound_warmup) \
            if config.plan.algorithm == "scaffold" else None

    def _pause(self, point: str, round_: int) -> None:
        self._hook(point, round_, lambda: self.stopping)

    # -- control -------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the run to end (thread- and signal-safe)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    # -- run -----------------------------------------------------------------------------

    def run(self, progress_callback: Callable[[Progress], None] | None = None) -> RunResult:
        """Run rounds until ``config.rounds`` rounds are finished (failed ones count) or
        :meth:`stop` is called. Resumes from the checkpoint in ``config.state_dir``.

        Args:
            progress_callback: called on the round thread with each :class:`Progress`.

        Returns:
            :class:`RunResult` with the records of the rounds this run finished.
        """
        cfg = self.config
        notify = self._observed(progress_callback)
        state_dir = cfg.state_dir
        self.db = StateDB(state_dir)
        records = self._records = []
        self._notify = notify
        try:
            self._load_eval_data()
            vector, round_done, version = self._resume(state_dir)
            self._start_metrics(version)
            self._vector = vector
            self.link.connect()
            self._connects_seen = self.link.connects
            self.receiver = BlobReceiver(timeout=max(10.0, cfg.round.deadline_s), max_size=self._update_limit)
            self.link.subscribe([topics.status_filter(self.fed), topics.update_filter(self.fed)], inbox=self.inbox)
            self._clear_inflight_tasks()
            if cfg.secure_aggregation.enabled:
                self._start_secure(notify)
            self._publish_model(vector, version, round_done)
            engine = self.engine = RoundEngine(
                self.fed, self.spec, kind=cfg.plan.update_kind, is_known=lambda d: d in self.registry.devices,
                max_update_bytes=self._update_limit,
                aggregator=cfg.aggregation.rule if self.privacy is None else self.privacy.aggregator,
                min_updates=cfg.round.min_updates, round=round_done, base_version=version,
                checks=self._update_checks(), lookup=self.db.transfer_outcome,
                aggregator_options=cfg.aggregation.options())
            while round_done < cfg.rounds and not self.stopping:
                rec = self._run_round(round_done + 1, version, vector, engine, notify)
                if rec is None:
                    break
                round_done, version = rec.round, rec.model_version
                self._report_evaluated(wait=False)
            self._report_evaluated(wait=True)
            return RunResult(records, self._module_of(vector), vector, version, stopped=round_done < cfg.rounds)
        finally:
            self._close_run()

    def _observed(self, callback: Callable[[Progress], None] | None) -> Callable[[Progress], None]:
        """``callback`` with every event counted in :attr:`metrics` first."""
        def notify(p: Progress) -> None:
            self.metrics.observe(p)
            if callback is not None:
                callback(p)
        return notify

    def _start_metrics(self, version: int) -> None:
        """Set the metrics to the resumed model and serve them on ``[metrics]`` when asked."""
        self.metrics.started(version, *self._last_eval)
        if self.privacy is not None:
            self.metrics.spent(self.privacy.epsilon)
        if self._serve_metrics:
            served = self.metrics.serve(self.config.metrics.address, self.config.metrics.port)
            log.info("metrics on %s", served.url)

    def _close_run(self) -> None:
        if self._evaluator is not None:
            self._evaluator.close(wait=False)
            self._evaluator = None
        if self._serve_metrics:
            self.metrics.close()
        # The last receipts and retained round state leave before the link closes (paho drops
        # what is still queued): bounded, and at once while the broker is unreachable.
        self.link.flush(FLUSH_TIMEOUT_S)
        self.link.close()
        self._flush_rejections()
        assert self.db is not None
        self.db.close()

    # -- start-up ------------------------------------------------------------------------

    def _meta(self) -> dict[str, str]:
        return {"task": self.task.name, "spec_hash": self.spec.hash, "optimizer": self.optimizer.name,
                "seed": str(self.config.seed), "federation": self.fed}

    def _checkpoint_meta(self, checks: UpdateChecks) -> dict[str, str]:
        """:meth:`_meta` with the accepted update norms (restored by :meth:`_resume`)."""
        meta = dict(self._meta(), norms=json.dumps([round(n, 6) for n in checks.norms]))
        if self.privacy is not None:
            meta["privacy"] = self.privacy.meta()
        return meta

    def _update_checks(self) -> UpdateChecks:
        """The claim and content checks of ``[limits]`` (data-set norm bound on by default),
        resumed with the norms of the checkpoint; the same in both modes."""
        lim = self.config.limits
        if self.privacy is not None:
            # Under DP the clip norm replaces the data-set norm bound (a data-dependent rule is
            # not post-processing of the noisy aggregate).
            return PrivacyChecks(self.privacy, max_samples=lim.max_samples, samples_of=self._announced_samples,
                                 norms=self._norms)
        checks = UpdateChecks(max_samples=lim.max_samples, samples_of=self._announced_samples,
                              norm_bound=lim.norm_bound, norm_factor=lim.norm_bound_factor,
                              norm_warmup=lim.norm_bound_warmup, norm_initial=lim.norm_bound_initial, norms=self._norms)
        return checks if self.scaffold is None else self.scaffold.checks(checks)  # type: ignore[return-value]

    def _announced_samples(self, device: str) -> int:
        dev = self.registry.devices.get(device)
        return dev.samples if dev is not None else 0

    def _resume(self, state_dir: Path) -> tuple[np.ndarray, int, int]:
        assert self.db is not None
        for path in remove_stale_temporaries(state_dir, (CHECKPOINT_NAME,)):
            log.warning("removed %s, left by a run killed while writing its checkpoint", path)
        self._norms: list[float] = []
        self.seal_key = load_or_create_key(state_dir)
        ckpt = load_checkpoint(state_dir)
        if ckpt is None:
            vector = flatten_params(self.model, self.spec)
            if self.config.downlink.compressed:
                self._residual = np.zeros(self.spec.size, dtype=np.float32)
            save_checkpoint(state_dir, Checkpoint(0, 0, vector, {}, self._meta(), downlink_residual=self._residual))
            self.db.delete_rounds_after(0)
            round_done, version = 0, 0
        else:
            want = self._meta()
            for key in ("task", "spec_hash", "optimizer", "federation"):
                if ckpt.meta.get(key) != want[key]:
                    raise StateError(f"{state_dir}/checkpoint.safetensors was made with {key} "
                                     f"{ckpt.meta.get(key)!r}, the configuration says {want[key]!r}: "
                                     f"use another state_dir")
            if ckpt.model.shape != (self.spec.size,):
                raise StateError(f"{state_dir}/checkpoint.safetensors: model of {ckpt.model.shape[0]} parameters, "
                                 f"expected {self.spec.size}")
            self.optimizer.load_state_arrays(ckpt.optimizer_state, self.spec.size)
            if self.scaffold is not None:
                self.scaffold.restore(ckpt.optimizer_state, f"{state_dir}/{CHECKPOINT_NAME}")
            vector, round_done, version = ckpt.model.copy(), ckpt.round, ckpt.version
            if self.privacy is not None:
                self.privacy.restore(ckpt.meta.get("privacy"), f"{state_dir}/{CHECKPOINT_NAME}")
            try:
                self._norms = [float(n) for n in json.loads(ckpt.meta.get("norms", "[]"))]
            except (ValueError, TypeError):
                raise StateError(f"{state_dir}/{CHECKPOINT_NAME}: bad 'norms' metadata") from None
            if self.config.downlink.compressed:
                # A checkpoint of a dense downlink starts with a zero residual.
                self._residual = (ckpt.downlink_residual.copy() if ckpt.downlink_residual is not None
                                  else np.zeros(self.spec.size, dtype=np.float32))
            elif ckpt.downlink_residual is not None and np.any(ckpt.downlink_residual):
                # Switching the downlink off publishes the server model itself: nothing is lost.
                vector = downlink.server_model(vector, ckpt.downlink_residual)
            if ckpt.record is not None:
                # The checkpoint is written before the database (and before the round's model
                # is evaluated): replay its record with the evaluation the database has, or
                # evaluate the model now when the run was killed before that finished.
                rec = ckpt.record
                if rec.test_loss is None and self._eval_data is not None and rec.state == "closed":
                    stored = self.db.evaluation(rec.round)
                    loss, acc = stored if stored is not None else evaluate_vector(
                        self.task, self.model, self.spec, vector, *self._eval_data,
                        batch_size=self.config.evaluation.batch_size)
                    rec = replace(rec, test_loss=loss, test_accuracy=acc)
                self.db.write_round(rec)
                self._last_eval = (rec.test_loss, rec.test_accuracy)
            self.db.delete_rounds_after(round_done)
            log.info("resumed from round %d, model version %d", round_done, version)
        for dev in self.db.devices():
            self.registry.restore(dev)
        return vector, round_done, version

    def _load_eval_data(self) -> None:
        data = self.config.evaluation.data
        if data == "none":
            return
        if data == "task":
            _, _, x, y = self.task.reference_split()
        elif data in ("digits", "mnist10k"):
            _, _, x, y = load_split(data)
        else:
            x, y = self.task.load_local(data, self.config.where("evaluation.data"))
        self._eval_data = (x, y)
        if self._evaluator is None:
            self._evaluator = BackgroundEvaluator(self.task, self.task.build_model(self.config.seed), self.spec,
                                                  self._eval_data, self.config.evaluation.batch_size)

    def _clear_inflight_tasks(self) -> None:
        """Clear retained tasks left by a round that was in flight when we were killed."""
        assert self.db is not None
        for device in self.db.inflight_devices():
            self.link.publish(topics.task(self.fed, device), b"", retain=True)
        self.db.set_inflight([])

    # -- one round -----------------------------------------------------------------------

    def _wait_for_devices(self, round_: int, notify: Callable[[Progress], None]) -> list[str]:
        """Eligible devices once there are enough: ``devices_to_wait_for``, or after
        ``wait_for_devices_s`` at least ``min_updates`` (a round with fewer cannot succeed,
        so none is opened: the wait goes on, logged every WAIT_LOG_INTERVAL_S). [] on stop."""
        cfg = self.config.round
        end = time.monotonic() + cfg.wait_for_devices_s
        next_log = time.monotonic()
        while not self.stopping:
            eligible = self.registry.eligible(self.task.name, self.spec.hash)
            now = time.monotonic()
            needed = max(cfg.min_updates, cfg.devices_to_wait_for if now < end else 0)
            if len(eligible) >= needed:
                return eligible
            if now >= next_log:
                log.info("waiting for devices: %d eligible (%d online), %d needed for round %d", len(eligible),
                         self.registry.online_count(), needed, round_)
                next_log = now + WAIT_LOG_INTERVAL_S
            notify(Progress("waiting", round_, online=self.registry.online_count()))
            self._pump(_POLL_S * 5)
        return []

    def _run_round(self, r: int, version: int, vector: np.ndarray, engine: RoundEngine,
                   notify: Callable[[Progress], None]) -> RoundRecord | None:
        cfg = self.config
        assert self.db is not None
        eligible = self._wait_for_devices(r, notify)
        if self.stopping:
            return None
        policy = cfg.round.participation()
        if self.privacy is not None:
            selected, target = self.privacy.select(eligible, r)
            if not self.privacy.admits(r):
                self.db.set_stopped(r, self.privacy.exhausted, time.time())
                self.stop()
                return None
        else:
            selected = select_devices(eligible, policy, cfg.seed, r)
            target = min(policy.target(len(eligible)), len(selected)) if selected else policy.target(len(eligible))
        started = time.time()
        deadline = started + cfg.round.deadline_s
        self._pause("selection", r)
        self.db.set_inflight(selected)
        self._gone.clear()
        engine.open(r, version, selected, target, deadline, started)
        plan = cfg.plan
        if plan.codec != "none":
            plan = replace(plan, density=cfg.warmup.density(plan.density, r))
        if self.privacy is not None:
            plan = self.privacy.plan(plan)
        for i, device in enumerate(selected):
            task = Task(self.fed, device, r, version, self.spec.hash, deadline, plan, self._published_sha,
                        secure_aggregation=self.secure is not None)
            self._publish_retained(topics.task(self.fed, device), task.to_bytes())
            if i == 0:
                self._pause("task_publish", r)
        self._publish_retained(topics.round_announcement(self.fed),
                               RoundAnnouncement(r, version, deadline, "open").to_bytes())
        log.info("round %d: %d eligible, %d selected, target %d, deadline in %.1f s", r, len(eligible),
                 len(selected), target, cfg.round.deadline_s)
        notify(Progress("round_open", r, len(selected), target, deadline=deadline,
                        online=self.registry.online_count()))
        if self.secure is not None:
            return self._secure_round(engine, vector, selected, deadline)
        while not self.stopping and not engine.complete:
            remaining = deadline - time.time()
            if remaining <= 0:
                break
            self._pump(min(_POLL_S, remaining), notify)
            request_repairs(self.link, self.fed, self.receiver)
            self._drop_gone(engine)
        if self.stopping:
            return None
        return self._close_round(engine, vector)

    def _close_round(self, engine: RoundEngine, vector: np.ndarray, closed: ClosedRound | None = None) -> RoundRecord:
        cfg = self.config
        assert self.db is not None
        closed = closed if closed is not None else engine.close(time.time())
        rec = closed.record
        if self.privacy is not None:
            # Charged with the checkpoint below, before the noisy model can be published
            # (coordinator/privacy.py, "When a round is charged").
            eps = (self.privacy.charge(rec.round, rec.accepted) if closed.model_delta is not None
                   else self.privacy.epsilon)
            rec = replace(rec, epsilon=eps)
        before = vector.copy() if self.secure is not None else None
        stepped = False
        delta_blob: bytes | None = None
        if closed.model_delta is not None:
            if self._residual is None:
                stepped = self._step(vector, closed.model_delta, rec.round)
            else:
                delta_blob = self._step_compressed(vector, closed.model_delta, rec.model_version, rec.round)
                stepped = delta_blob is not None
        if closed.model_delta is not None and not stepped:
            rec = replace(rec, state="failed", model_version=rec.base_version)
            self.rejections["non_finite_model"] += 1
        if self.scaffold is not None and stepped:
            self.scaffold.step(rec.model_version)
        elif self.scaffold is not None:
            self.scaffold.discard()
        rec = replace(rec, test_loss=None, test_accuracy=None,
                      bytes_down=int(sum(p.metrics.get(LINK_BYTES_IN, 0.0) for p in rec.participations)))
        meta = self._checkpoint_meta(engine.checks)
        if self._secure_outcome is not None:
            # On record with the round: a restart after the checkpoint tells the devices again.
            meta["secagg_result"] = self._secure_outcome.result_message().to_bytes().hex()
            meta["secagg_told"] = json.dumps(self._secure_outcome.told)
        # Durable first (the checkpoint is the source of truth), then visible.
        arrays = self.optimizer.state_arrays()
        if self.scaffold is not None:
            arrays.update(self.scaffold.state_arrays())
        save_checkpoint(cfg.state_dir, Checkpoint(rec.round, rec.model_version, vector, arrays,
                                                  meta, rec, self._residual),
                        before_rename=lambda: self._pause("checkpoint_write", rec.round))
        self._pause("checkpoint_rename", rec.round)
        self._pause("publishing", rec.round)
        self.db.write_round(rec)
        self.db.write_devices(list(self.registry.devices.values()))
        self._flush_rejections()
        for topic in [t for t, payload in self._retained.items() if payload == b""]:
            del self._retained[topic]  # cleared a round ago: whatever the broker kept is gone by now
        for device in engine.selection:
            self._publish_retained(topics.task(self.fed, device), b"")
        self.db.set_inflight([])
        if self.secure is not None and self._secure_outcome is not None:
            result = self._secure_outcome.result_message().to_bytes()
            for device in self._secure_outcome.told:
                self._publish_retained(topics.secagg_down(self.fed, device), result)
            if stepped and before is not None:
                self._last_change = vector - before
            self._secure_outcome = None
        self._publish_retained(topics.round_announcement(self.fed),
                               RoundAnnouncement(rec.round, rec.base_version, engine.deadline, rec.state).to_bytes())
        if stepped:
            self._pause("model_publish", rec.round)
            try:
                self._publish_model(vector, rec.model_version, rec.round, delta_blob)
            except TransportError as exc:
                # The broker went away mid-publication: publish it again once reconnected.
                log.warning("round %d: publishing model version %d failed (%s); republished on reconnect",
                            rec.round, rec.model_version, exc)
                self._model_at = (rec.model_version, rec.round)
                self._connects_seen = -1
            self._pause("model_published", rec.round)
        evaluation = self._evaluator.submit(vector) if stepped and self._evaluator is not None else None
        self._pending.append((rec, evaluation))
        return rec

    def _start_secure(self, notify: Callable[[Progress], None]) -> None:
        """Secure rounds on: the policy over this loop, and the result of the last round told
        again (a restart after its checkpoint may have cut it short)."""
        cfg = self.config

        def receive(timeout: float) -> Message | None:
            self._report_evaluated(wait=False)
            self._repair_retained()
            try:
                return self.inbox.get(timeout=timeout)
            except queue.Empty:
                return None

        def other(msg: Message) -> None:
            parsed = topics.parse_update_topic(self.fed, msg.topic)
            if parsed is not None and parsed[2] == "m" and msg.payload and not msg.retain \
                    and parsed[0] in self.registry.devices and self.engine is not None:
                # A plain client update in a secure round (an agent that ignores the task's
                # flag): refused and answered, so its device rolls it back.
                device, transfer, _ = parsed
                self._answer(device, transfer, self.engine.refuse(device, transfer, "secure_round",
                                                                  "a plain client update in a secure round"), notify)
                return
            if parsed is None or parsed[2] == "m" or msg.retain:
                self._handle(msg, notify)
            else:
                self.rejections["secure_round_chunk"] += 1  # of a plain update refused by its manifest

        io = PhaseIO(receive=receive, parse=lambda t: topics.parse_secagg_up(self.fed, t),
                     other=other, refuse=lambda r: self.rejections.update([r]),
                     gone=lambda d: d in self._gone, stopping=lambda: self.stopping)
        self.secure = SecureRound(self.fed, self.link, cfg.secure_aggregation, io, cfg.state_dir, self._pause)
        self.link.subscribe(topics.secagg_up_filter(self.fed), inbox=self.inbox)
        ckpt = load_checkpoint(cfg.state_dir)
        raw = ckpt.meta.get("secagg_result") if ckpt is not None else None
        if raw and ckpt is not None:
            try:
                result = sm.Result.from_bytes(bytes.fromhex(raw))
                told = [topics.check_id(d, "device") for d in json.loads(ckpt.meta.get("secagg_told", "[]"))]
            except (ValueError, FedmqError) as exc:
                raise StateError(f"{cfg.state_dir}/{CHECKPOINT_NAME}: bad secure-round result ({exc})") from None
            for device in told:
                self._publish_retained(topics.secagg_down(self.fed, device), result.to_bytes())

    def _secure_round(self, engine: RoundEngine, vector: np.ndarray, selected: list[str],
                      deadline: float) -> RoundRecord | None:
        """Run the round's secure attempt (coordinator.secure) and close the round with it."""
        assert self.secure is not None
        plan = self.config.plan
        # With ranking "gradient", also by the loss gradient on the coordinator's held-out gate
        # samples: the last change lies only on the last support (issue #26, docs/security.md).
        ranking = gate_gradient(self.task, self.model, self.spec, vector, self._eval_data,
                                self.config.evaluation.gate_samples) \
            if self.config.secure_aggregation.ranking == "gradient" else None
        support = plan_support(self.spec, self.config.warmup.density(plan.density, engine.round), plan.dense_below,
                               last_change=_support_ranking(ranking, self._last_change), seed=self.config.seed,
                               round_=engine.round, explore=self.config.secure_aggregation.explore)
        outcome = self.secure.run(engine.round, selected, size=self.spec.size, support=support, seed=self.config.seed,
                                  deadline=deadline)
        if self.stopping:
            return None
        closed, self._secure_outcome = closed_round(engine.close(time.time()), outcome, kind=plan.update_kind,
                                                    size=self.spec.size, min_updates=self.config.round.min_updates)
        log.info("round %d: secure attempt %s %s; phases %s", engine.round, outcome.attempt, outcome.state,
                 {name: round(s, 3) for name, s in outcome.phase_s.items()})
        return self._close_round(engine, vector, closed)

    def _report_evaluated(self, wait: bool) -> None:
        """Report the closed rounds whose evaluation finished (all of them when ``wait``), in
        round order: their test loss and accuracy into the database, then ``round_closed``."""
        if not self._pending:
            return
        assert self.db is not None
        while self._pending:
            rec, evaluation = self._pending[0]
            if evaluation is not None:
                if not wait and not evaluation.done():
                    return
                try:
                    loss, acc = evaluation.result()
                except Exception:  # noqa: BLE001 - a failed evaluation must not end the run
                    log.exception("round %d: evaluating model version %d failed", rec.round, rec.model_version)
                    loss, acc = None, None
                if loss is not None and not np.isfinite(loss):
                    log.error("round %d: model version %d evaluates to test loss %s", rec.round, rec.model_version,
                              loss)
                rec = replace(rec, test_loss=loss, test_accuracy=acc)
                self.db.set_evaluation(rec.round, loss, acc)
                self._last_eval = (loss, acc)
            self._pending.popleft()
            self._records.append(rec)
            log.info("round %d %s: accepted %d/%d, rejected %s, test accuracy %s, %.1f s", rec.round, rec.state,
                     rec.accepted, rec.target, rec.rejected or "{}",
                     "n/a" if rec.test_accuracy is None else f"{rec.test_accuracy:.4f}", rec.wall_s)
            self._notify(Progress("round_closed", rec.round, rec.participants, rec.target, rec.accepted,
                                  sum(rec.rejected.values()), online=self.registry.online_count(), record=rec))

    def _step(self, vector: np.ndarray, delta: np.ndarray, round_: int) -> bool:
        """Step the server optimizer on ``vector`` in place, unless the new global model
        would be non-finite or evaluate to a non-finite loss: then ``vector`` and the
        optimizer state stay as they were and False is returned (the round fails)."""
        before = {k: v.copy() for k, v in self.optimizer.state_arrays().items()}
        candidate = vector.copy()
        self.optimizer.step(candidate, delta)
        loss = self._gate(candidate) if np.isfinite(candidate).all() else float("nan")
        if loss is not None and not np.isfinite(loss):
            log.error("round %d: the new global model is non-finite or evaluates to loss %s: not published, "
                      "the round fails and the model stays", round_, loss)
            self.optimizer.load_state_arrays(before, self.spec.size)
            self._module_of(vector)
            return False
        vector[:] = candidate
        return True

    # -- retained state --------------------------------------------------------------------

    def _publish_retained(self, topic: str, payload: bytes) -> None:
        """Publish retained round state and remember it, to restore after a broker restart."""
        self._retained[topic] = payload
        self.link.publish(topic, payload, retain=True)

    def _repair_retained(self) -> None:
        """After a reconnect, publish the retained round state and the global model again.

        mosquitto saves retained messages only every ``autosave_interval`` and on a clean
        stop: after a kill -9 the model, its pointer, the tasks and the round announcement
        may be gone, half there, or an older copy. Publishing them again (same bytes) is
        harmless when they survived.
        """
        link = self.link
        if not link.connected or link.connects == self._connects_seen:
            return
        seen = link.connects
        try:
            for topic, payload in list(self._retained.items()):
                link.publish(topic, payload, retain=True)
            if self._model_at is not None and self._vector is not None:
                self._publish_model(self._vector, *self._model_at)
        except TransportError as exc:
            log.warning("restoring the retained state failed (%s); tried again", exc)
            return
        log.info("reconnected to the broker: retained round state and model version %s published again",
                 self._model_at[0] if self._model_at else "-")
        self._connects_seen = seen

    def _flush_rejections(self) -> None:
        """Add the rejections counted since the last flush (with the receiver's malformed
        chunks and the presence registry's refusals) to the database."""
        assert self.db is not None
        receiver = getattr(self, "receiver", None)
        sources = dict(receiver.stats) if receiver is not None else {}
        sources["registry_full"] = self.registry.refused
        for key, name in (("bad_messages", "malformed_chunk"), ("corrupt_chunks", "corrupt_chunk"),
                          ("hash_mismatch", "hash_mismatch"), ("early_dropped", "early_dropped"),
                          ("expired", "transfer_expired"), ("registry_full", "registry_full")):
            now = int(sources.get(key, 0))
            if now > self._receiver_seen[key]:
                self.rejections[name] += now - self._receiver_seen[key]
                self._receiver_seen[key] = now
        if self.rejections:
            self.db.add_rejections(self.rejections)
            self.rejections.clear()

    # -- messages ------------------------------------------------------------------------

    def _pump(self, timeout: float, notify: Callable[[Progress], None] | None = None) -> bool:
        """Handle the messages waiting in the inbox (waiting up to ``timeout`` s for the first)."""
        self._report_evaluated(wait=False)
        self._repair_retained()
        try:
            msg = self.inbox.get(timeout=timeout)
        except queue.Empty:
            return False
        while True:
            self._handle(msg, notify)
            try:
                msg = self.inbox.get_nowait()
            except queue.Empty:
                return True

    def _handle(self, msg: Message, notify: Callable[[Progress], None] | None) -> None:
        device = topics.device_of_status(self.fed, msg.topic)
        if device is not None:
            self._on_status(device, msg.payload)
            return
        parsed = topics.parse_update_topic(self.fed, msg.topic)
        if parsed is None or not msg.payload:
            return
        device, transfer, part = parsed
        engine = self.engine
        assert engine is not None
        if msg.retain:
            # Every later subscription would replay it: never assembled, cleared at once.
            self._clear_retained(msg.topic)
            if part == "m":
                self._answer(device, transfer, engine.refuse(device, transfer, "retained",
                                                             "client update published as a retained message",
                                                             _manifest_round(msg.payload)),
                             notify)
            return
        if device not in self.registry.devices:
            # No status ever seen: not one of ours. Nothing is allocated or answered for it.
            self.rejections["unknown_device"] += 1
            return
        self.registry.seen(device)
        dev = self.registry.devices.get(device)
        if dev is not None:
            dev.bytes_up += len(msg.payload)
        engine.count_bytes(device, transfer, len(msg.payload))
        if part == "c":
            blob = self.receiver.feed(msg.topic, msg.payload)
        else:
            # The manifest is parsed once, here, and its announced size judged before the
            # receiver allocates anything for the transfer.
            base = msg.topic[:-2]
            try:
                manifest = Manifest.from_bytes(msg.payload)
            except WireError as exc:
                self._answer(device, transfer, engine.refuse(device, transfer, "malformed", f"blob manifest: {exc}"),
                             notify)
                return
            verdict = (engine.admit(device, transfer, manifest.size, manifest.round)
                       or self._capacity(device, base, manifest.size))
            if isinstance(verdict, Rejected):
                # A device refused busy with none of its transfers in assembly settles on the
                # receipt (rolls its update back) and sends nothing more: its answer. While one
                # is in assembly, that one may still be its update.
                own, _ = self.receiver.pending_bytes(topics.update_base(self.fed, device, ""))
                verdict = engine.refuse(device, transfer, verdict.reason, verdict.detail, manifest.round,
                                        answered=(own == 0) if verdict.reason == "busy" else None)
            if verdict is not None:
                self._answer(device, transfer, verdict, notify)
                return
            blob = self.receiver.feed_manifest(base, manifest, msg.payload)
        if blob is not None:
            data = self._unseal(device, transfer, blob.data, blob.round)
            outcome = data if isinstance(data, Rejected) else engine.offer(device, transfer, data, blob.round)
            self._answer(device, transfer, outcome, notify)

    def _unseal(self, device: str, transfer: str, data: bytes, round_: int | None) -> bytes | Rejected:
        """The envelope inside a sealed update, a plain envelope as it is (unless sealing is
        required), or the refusal: ``unsealed`` or ``bad_seal`` (counted like every reason), naming
        ``round_``, the round the transfer's manifest named (None: the round in progress)."""
        engine = self.engine
        assert engine is not None
        if not is_sealed(data):
            if self.config.sealing.required:
                return engine.refuse(device, transfer, "unsealed", "a plain client update, [sealing] required is set",
                                     round_)
            return data
        assert self.seal_key is not None
        try:
            return self.seal_key.open_update(data, federation=self.fed, device=device, transfer_id=transfer)
        except SealError as exc:
            return engine.refuse(device, transfer, "bad_seal", str(exc), round_)

    def _capacity(self, device: str, base: str, size: int) -> Rejected | None:
        """``busy`` when admitting the transfer would exceed the assembly limits."""
        limits = self.config.limits
        if self.receiver.manifest(base) is not None:
            return None  # a duplicate manifest of a transfer already in assembly
        count, _ = self.receiver.pending_bytes(topics.update_base(self.fed, device, ""))
        if count >= limits.max_transfers_per_device:
            return Rejected("busy", f"{device!r} already has {count} transfers in assembly "
                                    f"(limits.max_transfers_per_device {limits.max_transfers_per_device})")
        _, total = self.receiver.pending_bytes()
        if total + size > limits.max_pending_bytes:
            return Rejected("busy", f"{total} bytes in assembly, {size} more would exceed "
                                    f"limits.max_pending_bytes {limits.max_pending_bytes}")
        return None

    def _clear_retained(self, topic: str) -> None:
        try:
            self.link.publish(topic, b"", retain=True)
        except TransportError as exc:
            log.warning("retained message on %s not cleared: %s", topic, exc)

    def _on_status(self, device: str, payload: bytes) -> None:
        if not payload:
            self.registry.on_cleared(device)
            return
        try:
            status = Status.from_bytes(payload)
        except WireError as exc:
            self.rejections["malformed_status"] += 1
            log.warning("status of %s ignored: %s", device, exc)
            return
        dev = self.registry.on_status(device, status)
        if dev is None and status.device != device:
            self.rejections["device_mismatch"] += 1
        if dev is not None and not dev.online:
            self._went_offline(device)
        elif dev is not None:
            self._gone.pop(device, None)
        for conflict in self.registry.conflict_reports():
            assert self.db is not None
            self.db.write_conflict(conflict)

    def _went_offline(self, device: str) -> None:
        """A device's offline status (its last will, or a clean leave) arrived: a selected
        device that has not answered is counted as dropped once ``round.drop_grace_s`` pass
        without it coming back (at once when 0), not at the deadline."""
        engine = self.engine
        if engine is None or not engine.is_open or device not in engine.selected or device in engine.answered:
            return
        if device not in self._gone:
            self._gone[device] = time.monotonic()
            log.info("round %d: %s went offline before answering", engine.round, device)
        self._drop_gone(engine)

    def _drop_gone(self, engine: RoundEngine) -> None:
        """Count as dropped the devices offline for ``round.drop_grace_s`` or more."""
        now = time.monotonic()
        for device, since in list(self._gone.items()):
            if now - since >= self.config.round.drop_grace_s:
                del self._gone[device]
                if engine.drop(device):
                    log.info("round %d: %s did not come back within %.0f s: dropped", engine.round, device,
                             self.config.round.drop_grace_s)

    def _answer(self, device: str, transfer: str, outcome: Outcome, notify: Callable[[Progress], None] | None) -> None:
        """Send the receipt the engine's outcome calls for; count the device's rounds."""
        engine = self.engine
        assert engine is not None
        self._pause("receipt", engine.round)
        if isinstance(outcome, Repeat):
            self._receipt(device, outcome.round, transfer, outcome.status, outcome.reason)
            return
        if isinstance(outcome, Accepted):
            if device in self.registry.devices:
                self.registry.devices[device].rounds += 1
            self._receipt(device, outcome.round, transfer, "accepted", "")
        else:
            assert isinstance(outcome, Rejected)
            self.rejections[outcome.reason] += 1
            log.info("update from %s (transfer %s) rejected: %s (%s)", device, transfer, outcome.reason,
                     outcome.detail)
            if outcome.answer:
                self._receipt(device, outcome.round, transfer, "rejected", outcome.reason)
        if notify is not None:
            notify(Progress("update", engine.round, len(engine.selection), engine.target, engine.aggregate.count,
                            sum(engine.rejected.values()), engine.deadline))

    def _receipt(self, device: str, round_: int, transfer: str, status: str, reason: str) -> None:
        try:
            self.link.publish(topics.receipt(self.fed, device),
                              Receipt(device, round_, transfer, status, reason).to_bytes())
        except TransportError as exc:
            log.warning("receipt to %s not sent: %s", device, exc)

    # -- model ---------------------------------------------------------------------------

    def _module_of(self, vector: np.ndarray) -> torch.nn.Module:
        load_params(self.model, vector, self.spec)
        return self.model

    def _gate(self, vector: np.ndarray) -> float | None:
        """The loss of a candidate global model on the first ``evaluation.gate_samples``
        held-out samples (coordinator.evaluation.gate_loss); None without evaluation data."""
        return gate_loss(self.task, self.model, self.spec, vector, self._eval_data,
                         self.config.evaluation.gate_samples)

    def _step_compressed(self, vector: np.ndarray, model_delta: np.ndarray, version: int,
                         round_: int) -> bytes | None:
        """Step the server model ``published + residual``, compress its distance to the
        published model (fedmq.fl.downlink), move ``vector`` (the published model) in place and
        keep the delta blob on disk before the checkpoint names the version (a restart
        republishes it). Returns the blob's bytes, or None (nothing changed, the round fails)
        when the new global model would be non-finite or evaluate to a non-finite loss."""
        assert self._residual is not None
        before = {k: v.copy() for k, v in self.optimizer.state_arrays().items()}
        server = downlink.server_model(vector, self._residual)
        self.optimizer.step(server, model_delta)
        base_sha = params_sha256(vector)
        codec = self.config.downlink.codec_config()
        codec = replace(codec, density=self.config.warmup.density(codec.density, round_))
        step = downlink.compress_step(vector, server, self.spec, codec) if np.isfinite(server).all() else None
        loss = self._gate(step.published) if step is not None else float("nan")
        if step is None or (loss is not None and not np.isfinite(loss)):
            log.error("round %d: the new global model is non-finite or evaluates to loss %s: not published, "
                      "the round fails and the model stays", round_, loss)
            self.optimizer.load_state_arrays(before, self.spec.size)
            self._module_of(vector)
            return None
        blob = DeltaBlob(self.config.downlink.codec, self.spec.hash, version - 1, version, base_sha,
                         params_sha256(step.published), step.payload).to_bytes()
        self._delta_dir().mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self._delta_path(version), blob)
        vector[:] = step.published
        self._residual = step.residual
        return blob

    def _delta_dir(self) -> Path:
        return self.config.state_dir / "downlink"

    def _delta_path(self, version: int) -> Path:
        return self._delta_dir() / f"delta-{version}.bin"

    def _retained_deltas(self, version: int) -> dict[int, Path]:
        """Delta files of the window ending at ``version``; removes the ones this coordinator
        wrote that fell out of it or belong to a version the checkpoint never reached."""
        out: dict[int, Path] = {}
        folder = self._delta_dir()
        if not folder.is_dir():
            return out
        low = version - self.config.downlink.window
        for path in folder.glob("delta-*.bin"):
            try:
                v = int(path.name[len("delta-"):-len(".bin")])
            except ValueError:
                continue
            if low < v <= version:
                out[v] = path
            else:
                path.unlink(missing_ok=True)
        return out

    def _publish_model(self, vector: np.ndarray, version: int, round_: int, delta_blob: bytes | None = None) -> None:
        """Publish ``version``. Dense downlink: retained blob + pointer, then clear versions
        older than the previous one (devices of the round just closed may still be fetching
        the previous one). Compressed downlink: the version's delta blob, a snapshot every
        ``snapshot_every`` versions (and at start), the version chain. Then the ONNX export when
        due (``export.onnx_every``, the first version of a run and the last round's)."""
        self._published_sha = params_sha256(vector) if self._residual is not None else ""
        self._model_at = (version, round_)
        if self.scaffold is not None:
            assert self.db is not None
            # Before the model: a task for this version finds its control variate on the broker.
            self.scaffold.publish(self.link, self.db, version)
        if self._residual is None:
            self._publish_snapshot(vector, version, round_)
        else:
            self._publish_chain(vector, version, round_, delta_blob)
        every = self.config.export.onnx_every
        due = not self._onnx_published or round_ >= self.config.rounds or (every > 0 and version % every == 0)
        if self.config.publish.onnx and due:
            self._onnx_published = True
            model = self._module_of(vector)
            onnx = export_onnx(model, self.task,
                               metadata=self.privacy.model_metadata() if self.privacy is not None else None)
            self._publish_blob("onnx", topics.onnx_blob(self.fed, version), topics.onnx_latest(self.fed), onnx,
                               version, round_, "onnx")

    def _publish_snapshot(self, vector: np.ndarray, version: int, round_: int) -> None:
        model = self._module_of(vector)
        blob = model_to_safetensors(model, {"version": str(version), "round": str(round_),
                                            "spec_hash": self.spec.hash, "task": self.task.name})
        self._publish_blob("model", topics.model_blob(self.fed, version), topics.model_latest(self.fed), blob,
                           version, round_, "safetensors")
        if self._residual is not None:
            self._snapshot = ChainEntry(version, len(blob), hashlib.sha256(blob).hexdigest(), params_sha256(vector))

    def _publish_chain(self, vector: np.ndarray, version: int, round_: int, delta_blob: bytes | None) -> None:
        """Deltas of the window (the new one, or at start all of them: the broker may have lost
        retained messages), the snapshot when due, then the chain; deltas that left the window
        are cleared from the broker."""
        assert self.db is not None
        cfg = self.config.downlink
        files = self._retained_deltas(version)
        fresh = {version: delta_blob} if delta_blob is not None else {v: p.read_bytes() for v, p in files.items()}
        entries: list[ChainEntry] = []
        for v in sorted(files):
            data = fresh.get(v)
            if data is None:
                data = files[v].read_bytes()
            else:
                base = topics.model_delta(self.fed, v)
                info = BlobSender(self.link).send(base, data, retain=True, timeout=120.0)
                self.db.add_published("delta", v, base, info.count)
            entries.append(ChainEntry(v, len(data), hashlib.sha256(data).hexdigest(), DeltaBlob.from_bytes(data).sha256))
        if self._snapshot is None or delta_blob is None or version % cfg.snapshot_every == 0:
            self._publish_snapshot(vector, version, round_)
        assert self._snapshot is not None
        chain = ModelChain(self.spec.hash, cfg.codec, self.config.seed, self._origin_sha, version,
                           self._published_sha, self._snapshot, tuple(entries))
        self.link.publish_wait(topics.model_chain(self.fed), chain.to_bytes(), retain=True, timeout=30.0)
        for old_version, old_base, count in self.db.published("delta"):
            if old_version not in files:
                clear_blob(self.link, old_base, count)
                self.db.remove_published("delta", old_version)

    def _publish_blob(self, kind: str, base: str, latest: str, blob: bytes, version: int, round_: int,
                      fmt: str) -> None:
        assert self.db is not None
        pointer = ModelPointer(version, self.spec.hash, round_, len(blob), hashlib.sha256(blob).hexdigest(), fmt)
        info = publish_model(self.link, self.fed, version, blob, pointer, kind=kind)
        self.db.add_published(kind, version, base, info.count)
        for old_version, old_base, count in self.db.published(kind):
            if old_version < version - 1:
                clear_blob(self.link, old_base, count)
                self.db.remove_published(kind, old_version)
