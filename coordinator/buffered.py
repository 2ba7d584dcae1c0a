"""The FedBuff round policy (``[round] mode = "async"``): leases, the buffer journal, a step every K.

:class:`BufferedRounds` is the policy the round driver (:mod:`coordinator.driver`) composes
in buffered asynchronous mode, over :class:`fedmq.fl.buffered.BufferedEngine`; everything
else (presence, blob transfers, receipts, evaluation, the server step, model publication,
checkpoint, database and the fault-injection points) is the driver's, as in synchronous
rounds. What the policy decides:

* **dispatch**: while fewer than ``[async] concurrency`` devices hold a task, idle eligible
  devices (online, the right task and ParamSpec, not busy, not yet answered for the step
  in progress) are drawn at random and sent a retained task naming the newest global model
  version, the task round ``step + 1`` and a lease of ``task_timeout_s`` seconds as its
  deadline. A device trains at most one update per server step;
* **answers**: every update is judged by the engine at once and answered with a receipt:
  ``accepted`` (in the buffer, weighted by staleness) or ``rejected`` (``stale`` above
  ``max_staleness``, or a reason of the synchronous checks); nothing is rejected for
  arriving late. A device is free again once answered or 60 s after its lease runs out
  (going offline does not free it: it may come back and resend); after a restart the devices that held a task
  unanswered stay busy for that task's round (recorded with its lease in the database's ``task_leases``) for a
  new lease: they resend what the killed coordinator did not answer;
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

import logging
import time
from pathlib import Path

import numpy as np

from coordinator.policy import PolicyParts, RoundContext, register_policy, warmed_plan
from coordinator.progress import Progress
from fedmq.wire import topics
from fedmq.storage.atomic import atomic_write_bytes, remove_stale_temporaries
from fedmq.wire.envelope import encode_update
from fedmq.fl.buffered import BufferedEngine
from fedmq.fl.rounds import Accepted, Outcome, RoundRecord
from fedmq.wire.messages import RoundAnnouncement, RoundTask
from fedmq.transport.flows import request_repairs


log = logging.getLogger("fedmq.coordinator")

#: Seconds after a task's lease before its device may be sent another task: by then the
#: agent has had its receipt or rolled the update back itself (its receipt_grace, 30 s by
#: default), so a newer task never makes it roll back an update still counted here.
LEASE_GRACE_S = 60.0
JOURNAL_DIR = "buffer"
#: A journaled update's file name: ``<seq>+<device>+<transfer>.bin`` (a regular expression).
JOURNAL_NAME = r"[0-9]{8}\+[^/+]+\+[^/+]+\.bin"
#: Steps whose participations are read back at start to answer resends.
_ANSWER_STEPS = 8


class BufferedRounds:
    """The FedBuff policy of one federation (module docstring). ``config.rounds`` counts
    server steps.

    Args:
        parts: the coordinator's parts (:class:`coordinator.policy.PolicyParts`).
    """

    def __init__(self, parts: PolicyParts) -> None:
        cfg = parts.config
        self.parts, self.config = parts, cfg
        #: device -> (task round, lease end in seconds since the epoch).
        self.busy: dict[str, tuple[int, float]] = {}
        #: device -> last task round it answered (or the step its journaled update is for).
        self.answered_round: dict[str, int] = {}
        self._journal_seq = 0
        self._dispatches = 0
        #: (device, task round, transfer) of the journaled updates replayed at start, to receipt.
        self._replayed: list[tuple[str, int, str]] = []
        #: Devices kept busy after a restart for a task whose round the database lacked.
        self._guessed: set[str] = set()
        self.engine = BufferedEngine(
            cfg.federation, parts.spec, kind=cfg.plan.update_kind, is_known=lambda d: d in parts.registry.devices,
            max_update_bytes=parts.update_limit, buffer_size=cfg.async_.buffer_size,
            staleness=cfg.async_.staleness(), checks=parts.checks, aggregator=cfg.aggregation.rule,
            started=time.time(), max_steps=cfg.rounds,
            task_round_of=lambda d: self.busy[d][0] if d in self.busy else None,
            aggregator_options=cfg.aggregation.options())
        self.receiver_timeout_s = max(10.0, cfg.async_.task_timeout_s)

    @property
    def round_in_progress(self) -> int:
        return self.engine.step + 1

    # -- start-up ------------------------------------------------------------------------

    def _journal(self, step: int) -> Path:
        return self.config.state_dir / JOURNAL_DIR / str(step)

    def resume(self, ctx: RoundContext, step: int, version: int) -> None:
        """The engine at the checkpoint's step, the answers of recent steps restored, the
        journal of the step after the checkpoint replayed into the buffer."""
        engine = self.engine
        engine.step, engine.version, engine.started = step, version, time.time()
        for s in range(max(1, step - _ANSWER_STEPS + 1), step + 1):
            for p in self.parts.db.participations(s):
                if p.transfer_id:
                    # The receipt names the task's round (the device matches it), not the step.
                    task_round = int(p.metrics.get("task_round", s))
                    engine.remember(p.device, p.transfer_id, p.status, p.reason, task_round)
                    self.answered_round[p.device] = max(self.answered_round.get(p.device, -1), task_round)
        self._replay_journal(engine, step)

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
                self.answered_round[device] = outcome.round
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
        # a coordinator killed while journaling an update leaves the writer's temporary file
        remove_stale_temporaries(folder, name_pattern=JOURNAL_NAME)
        try:
            folder.rmdir()
        except OSError:
            log.warning("buffer journal %s not empty: left in place", folder)

    def start(self, ctx: RoundContext) -> None:
        """After a restart the devices that held a task still train or resend for it: they
        stay busy for that task's round (a new lease) instead of being sent a newer task,
        which would make them roll back an update this coordinator may still accept; an
        answer for that round frees them, as before the restart. The replayed updates are
        receipted again."""
        engine = self.engine
        lease = time.time() + self.config.async_.task_timeout_s
        held = self.parts.db.task_leases()
        for device in self.parts.db.inflight_devices():
            # A database from before task rounds were recorded: the round is a guess, so
            # any answer from the device frees it.
            round_ = held[device][0] if device in held else engine.step + 1
            if device not in held:
                self._guessed.add(device)
            if self.answered_round.get(device, -1) < round_:
                self.busy[device] = (round_, lease)
        for device, round_, transfer in self._replayed:
            ctx.inbox.receipt(device, round_, transfer, "accepted", "")
        self._replayed.clear()
        log.info("async mode: step %d, model version %d, buffer %d/%d after replay", engine.step, engine.version,
                 len(engine.buffer), engine.buffer_size)

    # -- the loop ------------------------------------------------------------------------

    def advance(self, ctx: RoundContext) -> bool:
        engine = self.engine
        if engine.ready:  # a journal replayed full (killed between its last update and the step)
            ctx.step(engine.flush(time.time()))
            return True
        self._expire_leases()
        self._dispatch(ctx)
        ctx.pump(ctx.poll_s)
        request_repairs(self.parts.link, self.config.federation, ctx.receiver)
        return True

    def _dispatch(self, ctx: RoundContext) -> None:
        cfg, engine = self.config, self.engine
        free = cfg.async_.concurrency - len(self.busy)
        if free <= 0:
            return
        next_round = engine.step + 1
        idle = [d for d in self.parts.registry.eligible(self.parts.task.name, self.parts.spec.hash)
                if d not in self.busy and self.answered_round.get(d, -1) < next_round]
        if not idle:
            return
        self._dispatches += 1
        rng = np.random.default_rng([int(cfg.seed), next_round, self._dispatches])
        chosen = [idle[i] for i in sorted(rng.choice(len(idle), size=min(free, len(idle)), replace=False))]
        lease = time.time() + cfg.async_.task_timeout_s
        plan = warmed_plan(cfg, next_round)
        for device in chosen:
            task = RoundTask(cfg.federation, device, next_round, engine.version, self.parts.spec.hash, lease, plan,
                        ctx.publisher.published_sha)
            self.parts.link.publish(topics.task(cfg.federation, device), task.to_bytes(), retain=True)
            self.busy[device] = (next_round, lease)
        self.parts.db.set_task_leases(self.busy)
        log.debug("step %d: tasks sent to %d devices (%d busy)", next_round, len(chosen), len(self.busy))

    def _expire_leases(self) -> None:
        now = time.time()
        for device, (_, lease) in list(self.busy.items()):
            if now > lease + LEASE_GRACE_S:
                del self.busy[device]
                self._guessed.discard(device)

    def presence(self, device: str, online: bool) -> None:
        """An offline device keeps its task until its lease ends: it may come back and resend
        its update, and a newer task would make it roll that update back first."""

    # -- answers -------------------------------------------------------------------------

    def before_receipt(self, device: str, transfer: str, outcome: Accepted) -> None:
        """Durable before the receipt: a restart replays it instead of losing it."""
        self._journal_seq += 1
        atomic_write_bytes(self._journal(self.engine.step + 1) / f"{self._journal_seq:08d}+{device}+{transfer}.bin",
                           encode_update(outcome.update))

    def answered(self, ctx: RoundContext, device: str, outcome: Outcome) -> None:
        engine = self.engine
        if isinstance(outcome, Accepted) and engine.ready:
            # At once: the buffer holds exactly buffer_size updates, and an update queued
            # behind this one goes into the next buffer.
            ctx.step(engine.flush(time.time()))
        if outcome.update is not None:
            self.answered_round[device] = max(self.answered_round.get(device, -1), outcome.round)
            if device in self.busy and (self.busy[device][0] <= outcome.round or device in self._guessed):
                del self.busy[device]
                self._guessed.discard(device)

    def progress(self) -> Progress:
        engine = self.engine
        return Progress("update", engine.step + 1, len(self.busy), engine.buffer_size, len(engine.buffer),
                        sum(engine.rejected.values()))

    # -- the server step -----------------------------------------------------------------

    def checkpoint_meta(self) -> dict[str, str]:
        return {}

    def checkpoint_arrays(self, vector: np.ndarray, stepped: bool) -> dict[str, np.ndarray]:
        return {}

    def after_checkpoint(self, ctx: RoundContext, rec: RoundRecord, stepped: bool) -> None:
        """The step's journal goes (the checkpoint holds the step now); a failed step keeps the version."""
        if not stepped:
            self.engine.version = rec.base_version
        folder = self._journal(rec.round)
        if folder.is_dir():
            self._delete_journal(folder)
        log.info("step %d %s: %d updates (mean staleness %.2f), rejected %s, %.1f s", rec.round, rec.state,
                 rec.accepted, rec.device_metrics.get("staleness", float("nan")), rec.rejected or "{}", rec.wall_s)

    def finish(self, ctx: RoundContext) -> None:
        # What is already queued hears ``finished`` for its own round (the device rolls
        # it back into its residual) instead of resending to a coordinator that left.
        ctx.pump(0.0)
        fed = self.config.federation
        for device in list(self.busy):
            self.parts.link.publish(topics.task(fed, device), b"", retain=True)
        self.busy.clear()
        self.parts.db.set_task_leases({})
        # Acknowledged in order: once this is, every receipt before it left too
        # (closing the link drops what paho still queues).
        self.parts.link.publish_wait(topics.round_announcement(fed),
                                     RoundAnnouncement(self.engine.step, self.engine.version, 0.0,
                                                       "closed").to_bytes(), retain=True)


register_policy("async", BufferedRounds)
