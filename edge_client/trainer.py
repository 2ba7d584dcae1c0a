"""One round's client update on a device: load the global model the task names, train on the
local data off the loop thread, then package the update with error feedback (codec, envelope,
sealing to the coordinator's key) and commit it before it is sent, or hand it to a secure round.

A global model that cannot be used (unreadable, non-finite, or training on it gives a
non-finite update) skips the round, says so in the log and the systemd status, and the agent
goes on with the next task.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace

import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from edge_client.config import EdgeConfig
from edge_client.connection import Connection
from edge_client.localdata import LocalData
from edge_client.loop import Heartbeat
from edge_client.model_sync import ModelSync
from edge_client.sdnotify import Notifier
from edge_client.secure_rounds import SecureRounds
from edge_client.scaffold import ScaffoldDevice
from edge_client.settlement import Settlement
from edge_client.state import DeviceState
from fedmq.errors import FedmqError, NonFiniteError
from fedmq.fl.feedback import ErrorFeedback
from fedmq.fl.client import package_update, train_for_task
from fedmq.fl.training import LocalResult
from fedmq.wire.messages import RoundTask
from fedmq.model.params import ParamSpec
from fedmq.security.sealing import seal_update
from fedmq.tasks import Task
from fedmq.transport.counting import LINK_BYTES_IN, LINK_BYTES_OUT

log = logging.getLogger("edge_client.agent")


class Trainer:
    """Runs the rounds a device takes part in.

    Args:
        cfg: ``seed``, ``max_train_seconds``, ids.
        conn: the connection (the status after the local data changed; its traffic counters).
        state, feedback: the durable state and the error-feedback memory.
        model, spec, task_def, local: the device's model, its ParamSpec, its task, its data.
        coordinator_key: the pinned key client updates are sealed to (None: sent in the clear).
        parts: ``heartbeat`` (work off the loop thread), ``sync`` (the global model),
            ``settlement`` (commit and send), ``secure`` (secure rounds).
        counters: ``rounds_trained``, ``updates_sent``, ``late_tasks``, ``bad_models``.
        notifier: systemd status lines.
        pause: the test hook (``fetching``, ``training``, ``publishing``, ``published``).

    Attributes:
        pace: called on the training worker after local training with ``(task, result)``; the
            fleet simulator (fleet/fleet.py) uses it for a device's compute speed and for
            dropout mid-training. None on real devices.
    """

    def __init__(self, cfg: EdgeConfig, conn: Connection, state: DeviceState, feedback: ErrorFeedback, *,
                 model: torch.nn.Module, spec: ParamSpec, task_def: Task, local: LocalData,
                 coordinator_key: X25519PublicKey | None, heartbeat: Heartbeat, sync: ModelSync,
                 settlement: Settlement, secure: SecureRounds, scaffold: ScaffoldDevice, counters: Counter[str],
                 notifier: Notifier, pause: Callable[[str, int], None]) -> None:
        self.cfg, self.conn, self.state, self.feedback = cfg, conn, state, feedback
        self.model, self.spec, self.task_def, self.local = model, spec, task_def, local
        self.coordinator_key = coordinator_key
        self.heartbeat, self.sync, self.settlement, self.secure = heartbeat, sync, settlement, secure
        #: Scaffold's control variate c_i and its residual (edge_client/scaffold.py; used when a task asks).
        self.scaffold = scaffold
        self.counters, self.notifier, self.pause = counters, notifier, pause
        self.pace: Callable[[RoundTask, LocalResult], None] | None = None
        self._reported = conn.link.traffic.snapshot()

    def run_round(self, task: RoundTask, stop: threading.Event) -> None:
        """Take part in ``task``'s round: fetch, train, send (or skip it, saying why). Returns
        early, the round not done, when ``stop`` is set while it fetches or trains.

        Raises: StateError when the state folder cannot be written."""
        cfg = self.cfg
        if task.spec_hash != self.spec.hash:
            self.conn.refuse(f"round {task.round}: the task is for ParamSpec {task.spec_hash}, this device's task "
                             f"{self.task_def.name!r} ({cfg.where('task')}) has {self.spec.hash}")
            self.state.finish_round(task.round, task.deadline)
            return
        if time.time() >= task.deadline:
            self.counters["late_tasks"] += 1
            log.warning("round %d: deadline already passed: skipped", task.round)
            self.state.finish_round(task.round, task.deadline)
            return
        self.pause("fetching", task.round)
        self.notifier.status(f"round {task.round}: fetching model {task.model_version}")
        try:
            if not self.sync.load(task.model_version, stop, task.model_sha256):
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
            self.conn.publish_status()
        plan = task.plan
        cap = min(c for c in (plan.max_seconds, cfg.max_train_seconds) if c > 0)
        self.notifier.status(f"round {task.round}: training")
        try:
            result: LocalResult | None = self.heartbeat.in_worker(lambda: self._train(task, cap), 2 * cap + 60.0,
                                                                  stop)
        except FedmqError as exc:
            self._skip_bad_model(task, f"local training failed ({exc})")
            return
        if result is None:
            return
        self.counters["rounds_trained"] += 1
        self.pause("training", task.round)

        if time.time() >= task.deadline:
            # Too late to count: keep what it learned in the residual instead.
            log.warning("round %d: training ended after the deadline: update kept in the residual", task.round)
            if plan.error_feedback:
                self.feedback.rollback(result.update)
            self.state.save_residual(self.feedback, task.round, task.deadline)
            return
        # What this link carried since the last update, reported with this one (counting).
        traffic = self.conn.link.traffic.snapshot()
        result = replace(result, metrics=dict(result.metrics, **{
            LINK_BYTES_IN: float(traffic["bytes_in"] - self._reported["bytes_in"]),
            LINK_BYTES_OUT: float(traffic["bytes_out"] - self._reported["bytes_out"])}))
        self._reported = traffic
        if task.secure_aggregation:
            if not self.secure.provide(task, result.update):
                self._skip_bad_model(task, "training on it gave a non-finite update")
            return
        self._send(task, result)

    def _train(self, task: RoundTask, cap: float) -> LocalResult:
        local, cfg = self.local, self.cfg
        correction = self.scaffold.correction(task, self.conn.link, cfg.federation, cfg.fetch_timeout) \
            if task.plan.algorithm == "scaffold" else None
        result = train_for_task(self.model, local.x, local.y, task, seed=cfg.seed, max_seconds=cap,
                                x_val=local.x_val, y_val=local.y_val, task_def=self.task_def, correction=correction)
        if self.pace is not None:
            self.pace(task, result)
        return result

    def _send(self, task: RoundTask, result: LocalResult) -> None:
        """Package the update (error feedback, codec, envelope, seal), commit it with the
        residual, then publish it."""
        cfg = self.cfg
        try:
            control = self.scaffold.package(task, result, cfg.seed) if task.plan.algorithm == "scaffold" else b""
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
        inflight = self.settlement.begin(data, task, transfer_id=transfer_id, with_feedback=task.plan.error_feedback,
                                         sealed=sealed)
        self.pause("publishing", task.round)
        self.notifier.status(f"round {task.round}: sending update ({len(data if sealed is None else sealed)} bytes"
                             f"{', sealed' if sealed is not None else ''})")
        self.settlement.send()
        self.counters["updates_sent"] += 1
        log.info("round %d: update sent (%d bytes, transfer %s, %d steps in %.2f s, train loss %.4f)",
                 task.round, len(data), inflight.transfer_id, result.steps, result.seconds,
                 result.metrics.get("train_loss", float("nan")))
        self.pause("published", task.round)

    def _skip_bad_model(self, task: RoundTask, why: str) -> None:
        """Skip a round whose global model cannot be used; the agent keeps serving."""
        self.counters["bad_models"] += 1
        log.error("round %d: global model %d unusable: %s: round skipped", task.round, task.model_version, why)
        self.notifier.status(f"round {task.round}: global model {task.model_version} unusable ({why}); skipped")
        self.state.finish_round(task.round, task.deadline)
