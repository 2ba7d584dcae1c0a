"""The coordinator in buffered asynchronous mode (``[round] mode = "async"``, FedBuff).

A thin loop over :class:`fedmq.fl.buffered.BufferedEngine`; everything else (presence,
blob transfers, receipts, evaluation, model publication, checkpoint and database) is the
synchronous coordinator's (:class:`coordinator.service.Coordinator`).

The loop:

* **dispatch**: while fewer than ``[async] concurrency`` devices hold a task, idle eligible
  devices (online, the right task and ParamSpec, not busy, not yet answered for the step
  in progress) are drawn at random and sent a retained task naming the newest global model
  version, the task round ``step + 1`` and a lease of ``task_timeout_s`` seconds as its
  deadline. A device trains at most one update per server step;
* **answers**: every update is judged by the engine at once and answered with a receipt:
  ``accepted`` (in the buffer, weighted by staleness) or ``rejected`` (``stale`` above
  ``max_staleness``, or a reason of the synchronous checks); nothing is rejected for
  arriving late. A device is free again once answered or 60 s after its lease runs out
  (going offline does not free it: it may come back and resend); after a restart the devices that held a task stay
  busy for a new lease (they resend what the killed coordinator did not answer);
* **step**: once the buffer holds ``buffer_size`` updates the server optimizer steps,
  the coordinator evaluates, checkpoints, writes the step's record (one row of ``rounds``,
  ``round`` = step) and publishes the new global model version.

Crash consistency (kill -9 mid-buffer): an accepted update is written to the buffer
journal ``state_dir/buffer/<step>/<seq>+<device>+<transfer>.bin`` (the exact blob,
atomically, before its receipt is sent). A restart replays the journal of the step after
the checkpoint into a fresh buffer: the same updates, the same staleness (no step happened
since), the same weights; a device resending a journaled transfer gets its first answer
(``accepted``). The journal of a step is deleted after that step's checkpoint is written;
a journal of a step the checkpoint already holds is deleted at start. So every accepted
update counts exactly once, whatever instant the coordinator dies at.
"""

from __future__ import annotations

from typing import Any

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from coordinator.config import CoordinatorConfig
from coordinator.service import Coordinator, Progress, RunResult
from coordinator.state import Checkpoint, StateDB, save_checkpoint
from fedmq import topics
from fedmq.atomic import atomic_write_bytes
from fedmq.envelope import encode_update
from fedmq.fl.buffered import BufferedEngine
from fedmq.fl.rounds import Accepted, Outcome, Rejected, Repeat, RoundRecord
from fedmq.messages import RoundAnnouncement, Task
from fedmq.transport import Link
from fedmq.transport.counting import LINK_BYTES_IN
from fedmq.transport.flows import request_repairs
from fedmq.transport.receiver import BlobReceiver

log = logging.getLogger("fedmq.coordinator")

_POLL_S = 0.2
#: Seconds after a task's lease before its device may be sent another task: by then the
#: agent has had its receipt or rolled the update back itself (its receipt_grace, 30 s by
#: default), so a newer task never makes it roll back an update still counted here.
LEASE_GRACE_S = 60.0
JOURNAL_DIR = "buffer"
#: Steps whose participations are read back at start to answer resends.
_ANSWER_STEPS = 8


def make_coordinator(config: CoordinatorConfig, link: Link | None = None, **kwargs: Any) -> Coordinator:
    """The coordinator for ``config``'s mode: :class:`BufferedCoordinator` for
    ``[round] mode = "async"``, else :class:`coordinator.service.Coordinator` (``kwargs``:
    its keyword arguments, e.g. ``metrics``)."""
    if config.round.mode == "async":
        return BufferedCoordinator(config, link, **kwargs)
    return Coordinator(config, link, **kwargs)


class BufferedCoordinator(Coordinator):
    """The coordinator of one federation in FedBuff mode (module docstring).

    ``config.rounds`` counts server steps. Same arguments, errors and :meth:`run` result as
    :class:`coordinator.service.Coordinator`.
    """

    def __init__(self, config: CoordinatorConfig, link: Link | None = None, **kwargs: Any) -> None:
        super().__init__(config, link, **kwargs)
        #: device -> (task round, lease end in seconds since the epoch).
        self.busy: dict[str, tuple[int, float]] = {}
        #: device -> last task round it answered (or the step its journaled update is for).
        self.answered: dict[str, int] = {}
        self._journal_seq = 0
        self._dispatches = 0
        #: (device, task round, transfer) of the journaled updates replayed at start, to receipt.
        self._replayed: list[tuple[str, int, str]] = []
        self._vector = np.zeros(0, dtype=np.float32)

    # -- run -----------------------------------------------------------------------------

    def run(self, progress_callback: Callable[[Progress], None] | None = None) -> RunResult:
        cfg = self.config
        notify = self._observed(progress_callback)
        self.db = StateDB(cfg.state_dir)
        records: list[RoundRecord] = []
        try:
            self._load_eval_data()
            vector, step, version = self._resume(cfg.state_dir)
            self._start_metrics(version)
            engine = self.engine = BufferedEngine(  # type: ignore[assignment]
                self.fed, self.spec, kind=cfg.plan.update_kind, is_known=lambda d: d in self.registry.devices,
                max_update_bytes=self._update_limit, buffer_size=cfg.async_.buffer_size,
                staleness=cfg.async_.staleness(), checks=self._update_checks(), aggregator=cfg.aggregation.rule,
                step=step, version=version, started=time.time(), max_steps=cfg.rounds,
                task_round_of=lambda d: self.busy[d][0] if d in self.busy else None,
                aggregator_options=cfg.aggregation.options())
            self._vector, self._records, self._notify = vector, records, notify
            self._restore_answers(engine, step)
            self._replay_journal(engine, step)
            self.link.connect()
            self._connects_seen = self.link.connects
            self.receiver = BlobReceiver(timeout=max(10.0, cfg.async_.task_timeout_s),
                                         max_size=cfg.limits.max_update_bytes)
            self.link.subscribe([topics.status_filter(self.fed), topics.update_filter(self.fed)], inbox=self.inbox)
            self._clear_inflight_tasks()
            for device, round_, transfer in self._replayed:
                self._receipt(device, round_, transfer, "accepted", "")
            self._replayed.clear()
            self._publish_model(vector, version, step)
            log.info("async mode: step %d, model version %d, buffer %d/%d after replay", step, version,
                     len(engine.buffer), engine.buffer_size)
            while engine.step < cfg.rounds and not self.stopping:
                if engine.ready:  # a journal replayed full (killed between its last update and the step)
                    self._server_step(engine)
                    continue
                self._expire_leases()
                self._dispatch(engine)
                self._pump(_POLL_S, notify)
                request_repairs(self.link, self.fed, self.receiver)
            if not self.stopping:
                # What is already queued hears ``finished`` for its own round (the device rolls
                # it back into its residual) instead of resending to a coordinator that left.
                self._pump(0.0, notify)
                for device in list(self.busy):
                    self.link.publish(topics.task(self.fed, device), b"", retain=True)
                self.busy.clear()
                self.db.set_inflight([])
                # Acknowledged in order: once this is, every receipt before it left too
                # (closing the link drops what paho still queues).
                self.link.publish_wait(topics.round_announcement(self.fed),
                                       RoundAnnouncement(engine.step, engine.version, 0.0, "closed").to_bytes(),
                                       retain=True)
            self._report_evaluated(wait=True)
            return RunResult(records, self._module_of(vector), vector, engine.version,
                             stopped=engine.step < cfg.rounds)
        finally:
            self._close_run()

    # -- start-up ------------------------------------------------------------------------

    def _journal(self, step: int) -> Path:
        return self.config.state_dir / JOURNAL_DIR / str(step)

    def _restore_answers(self, engine: BufferedEngine, step: int) -> None:
        assert self.db is not None
        for s in range(max(1, step - _ANSWER_STEPS + 1), step + 1):
            for p in self.db.participations(s):
                if p.transfer_id:
                    # The receipt names the task's round (the device matches it), not the step.
                    engine.remember(p.device, p.transfer_id, p.status, p.reason,
                                    int(p.metrics.get("task_round", s)))

    def _replay_journal(self, engine: BufferedEngine, step: int) -> None:
        """Put the updates accepted into the buffer of step ``step + 1`` back (same order);
        delete journals of steps the checkpoint already holds."""
        root = self.config.state_dir / JOURNAL_DIR
        if not root.is_dir():
            return
        for folder in sorted(root.iterdir()):
            if folder.is_dir() and folder.name.isdigit() and int(folder.name) <= step:
                self._delete_journal(folder)
        folder = self._journal(step + 1)
        if not folder.is_dir():
            return
        # Every journaled update passed the checks once, its device included (a device first
        # seen in this buffer is not in the database yet), and its sample count against the
        # status the device announced then (the database may hold an older one). The norm
        # bound needs no exception: the checkpoint's norms and the same order repeat it.
        is_known, engine.is_known = engine.is_known, lambda _d: True
        samples_of, engine.checks.samples_of = engine.checks.samples_of, lambda _d: 0
        for path in sorted(folder.glob("*.bin")):
            seq, device, transfer = path.stem.split("+", 2)
            self._journal_seq = max(self._journal_seq, int(seq))
            outcome = engine.offer(device, transfer, path.read_bytes())
            if isinstance(outcome, Accepted):
                self.answered[device] = outcome.round
                # Journaled before its receipt was sent: the kill may have lost that receipt,
                # and a device resending after the federation's last step hears nobody.
                self._replayed.append((device, outcome.round, transfer))
            else:
                log.warning("journaled update %s not accepted on replay (%s): dropped from the buffer", path.name,
                            outcome)
                path.unlink()
        engine.is_known = is_known
        engine.checks.samples_of = samples_of

    @staticmethod
    def _delete_journal(folder: Path) -> None:
        for path in folder.glob("*.bin"):
            path.unlink()
        try:
            folder.rmdir()
        except OSError:
            log.warning("buffer journal %s not empty: left in place", folder)

    # -- devices -------------------------------------------------------------------------

    def _dispatch(self, engine: BufferedEngine) -> None:
        cfg = self.config
        free = cfg.async_.concurrency - len(self.busy)
        if free <= 0:
            return
        next_round = engine.step + 1
        idle = [d for d in self.registry.eligible(self.task.name, self.spec.hash)
                if d not in self.busy and self.answered.get(d, -1) < next_round]
        if not idle:
            return
        self._dispatches += 1
        rng = np.random.default_rng([int(cfg.seed), next_round, self._dispatches])
        chosen = [idle[i] for i in sorted(rng.choice(len(idle), size=min(free, len(idle)), replace=False))]
        lease = time.time() + cfg.async_.task_timeout_s
        plan = replace(cfg.plan, codec=cfg.warmup.apply(cfg.plan.codec, next_round))
        for device in chosen:
            task = Task(self.fed, device, next_round, engine.version, self.spec.hash, lease, plan,
                        self._published_sha)
            self.link.publish(topics.task(self.fed, device), task.to_bytes(), retain=True)
            self.busy[device] = (next_round, lease)
        assert self.db is not None
        self.db.set_inflight(sorted(self.busy))
        log.debug("step %d: tasks sent to %d devices (%d busy)", next_round, len(chosen), len(self.busy))

    def _expire_leases(self) -> None:
        now = time.time()
        for device, (_, lease) in list(self.busy.items()):
            if now > lease + LEASE_GRACE_S:
                del self.busy[device]

    def _clear_inflight_tasks(self) -> None:
        """After a restart the devices that held a task still train or resend for it: they
        stay busy (a new lease) instead of being sent a newer task, which would make them
        roll back an update this coordinator may still accept."""
        assert self.db is not None
        engine = self.engine
        assert isinstance(engine, BufferedEngine)
        lease = time.time() + self.config.async_.task_timeout_s
        for device in self.db.inflight_devices():
            if self.answered.get(device, -1) < engine.step + 1:
                self.busy[device] = (engine.step + 1, lease)

    def _went_offline(self, device: str) -> None:
        """An offline device keeps its task until its lease ends: it may come back and resend
        its update, and a newer task would make it roll that update back first."""

    # -- answers -------------------------------------------------------------------------

    def _answer(self, device: str, transfer: str, outcome: Outcome, notify: Callable[[Progress], None] | None) -> None:
        engine = self.engine
        assert isinstance(engine, BufferedEngine)
        if isinstance(outcome, Repeat):
            self._receipt(device, outcome.round, transfer, outcome.status, outcome.reason)
            return
        if isinstance(outcome, Accepted):
            # Durable before the receipt: a restart replays it instead of losing it.
            self._journal_seq += 1
            atomic_write_bytes(self._journal(engine.step + 1) / f"{self._journal_seq:08d}+{device}+{transfer}.bin",
                               encode_update(outcome.update))
            if device in self.registry.devices:
                self.registry.devices[device].rounds += 1
            self._receipt(device, outcome.round, transfer, "accepted", "")
            if engine.ready:
                # At once: the buffer holds exactly buffer_size updates, and an update queued
                # behind this one goes into the next buffer.
                self._server_step(engine)
        else:
            assert isinstance(outcome, Rejected)
            self.rejections[outcome.reason] += 1
            log.info("update from %s (transfer %s) rejected: %s (%s)", device, transfer, outcome.reason,
                     outcome.detail)
            self._receipt(device, outcome.round, transfer, "rejected", outcome.reason)
        if outcome.update is not None:
            self.answered[device] = max(self.answered.get(device, -1), outcome.round)
            if device in self.busy and self.busy[device][0] <= outcome.round:
                del self.busy[device]
        if notify is not None:
            notify(Progress("update", engine.step + 1, len(self.busy), engine.buffer_size, len(engine.buffer),
                            sum(engine.rejected.values())))

    # -- the server step -----------------------------------------------------------------

    def _server_step(self, engine: BufferedEngine) -> RoundRecord:
        """Empty the buffer into one server step, as a synchronous round closes: the server
        optimizer steps (on ``published + residual`` with a compressed downlink, whose delta
        is compressed with server-side error feedback), then checkpoint, record, publication;
        the evaluation follows in the background. A step whose new global model would be
        non-finite fails: the model, the optimizer state and the version stay."""
        cfg = self.config
        vector = self._vector
        assert self.db is not None
        closed = engine.flush(time.time())
        rec = closed.record
        assert closed.model_delta is not None
        delta_blob: bytes | None = None
        if self._residual is None:
            stepped = self._step(vector, closed.model_delta, rec.round)
        else:
            delta_blob = self._step_compressed(vector, closed.model_delta, rec.model_version, rec.round)
            stepped = delta_blob is not None
        if not stepped:
            rec = replace(rec, state="failed", model_version=rec.base_version)
            engine.version = rec.base_version
            self.rejections["non_finite_model"] += 1
        rec = replace(rec, test_loss=None, test_accuracy=None,
                      bytes_down=int(sum(p.metrics.get(LINK_BYTES_IN, 0.0) for p in rec.participations)))
        # Durable first (the checkpoint is the source of truth), then the journal goes.
        save_checkpoint(cfg.state_dir, Checkpoint(rec.round, rec.model_version, vector, self.optimizer.state_arrays(),
                                                  self._checkpoint_meta(engine.checks), rec, self._residual))
        self.db.write_round(rec)
        self.db.write_devices(list(self.registry.devices.values()))
        self._flush_rejections()
        folder = self._journal(rec.round)
        if folder.is_dir():
            self._delete_journal(folder)
        if stepped:
            self._publish_model(vector, rec.model_version, rec.round, delta_blob)
        log.info("step %d %s: %d updates (mean staleness %.2f), rejected %s, %.1f s", rec.round, rec.state,
                 rec.accepted, rec.device_metrics.get("staleness", float("nan")), rec.rejected or "{}", rec.wall_s)
        # Evaluated in the background as in synchronous mode; reported (round_closed) when done.
        self._pending.append((rec, self._evaluator.submit(vector) if stepped and self._evaluator is not None
                              else None))
        self._report_evaluated(wait=False)
        return rec
