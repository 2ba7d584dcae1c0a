"""The round driver: the coordinator's loop, written once for every round policy.

:class:`RoundDriver` resumes from the checkpoint, connects, lets the policy settle what a
killed run left, publishes the global model, then turns the loop: ``policy.advance`` (a
synchronous round with its phases, or a FedBuff dispatch and inbox drain) until the
configured number of rounds (server steps) is done or a stop is asked. Whatever the policy,
a server step goes through :meth:`RoundDriver.step`: the privacy charge, the server optimizer
(:class:`coordinator.stepper.Stepper`), the checkpoint (durable first: the source of truth),
the database, the policy's own clean-up, the model's publication, the background evaluation;
and through the same fault-injection points (:mod:`coordinator.faults`). Between two messages
the driver reports finished evaluations and repairs the retained state after a reconnect.
"""

from __future__ import annotations

import json
import logging
import queue
import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from coordinator.config import CoordinatorConfig
from coordinator.faults import RunControl
from coordinator.inbox import Inbox
from coordinator.phases import PhaseIO
from coordinator.policy import RoundPolicy
from coordinator.presence import DeviceRegistry
from coordinator.privacy import PrivacyGuard
from coordinator.progress import Evaluations, Progress, Reporter, RunResult
from coordinator.publisher import Publisher
from coordinator.scaffold import ScaffoldServer
from coordinator.resume import resume
from coordinator.state import Checkpoint, StateDB, save_checkpoint
from coordinator.stepper import Stepper
from fedmq.wire import topics
from fedmq.fl.rounds import ClosedRound, RoundRecord
from fedmq.security.sealing import CoordinatorKey
from fedmq.transport import Message
from fedmq.transport.counting import LINK_BYTES_IN, CountingLink
from fedmq.transport.receiver import BlobReceiver

log = logging.getLogger("fedmq.coordinator")

#: Longest single wait on the inbox (seconds): bounds how late a stop request is seen.
POLL_S = 0.2
#: Seconds between two "waiting for devices" log lines.
WAIT_LOG_INTERVAL_S = 30.0
#: Seconds the coordinator waits, when it stops, for its last publishes to be acknowledged.
FLUSH_TIMEOUT_S = 5.0


class RoundDriver:
    """The loop over one round policy (module docstring).

    Args:
        config: the configuration; ``link``: the coordinator's link (not yet connected).
        policy: the round policy; ``stepper``, ``publisher``: the server step and publication.
        registry, db: presence and the state database; ``seal_key``: devices seal to it.
        privacy: differential privacy, else None; ``control``: stop request and test hook.
        evaluations: the background evaluation of each new model; ``report``: progress events.
        meta: what every checkpoint names (task, ParamSpec hash, optimizer, seed, federation).
        serve_metrics: serve ``report.metrics`` on ``[metrics]`` during :meth:`run`.
    """

    poll_s = POLL_S

    def __init__(self, config: CoordinatorConfig, link: CountingLink, policy: RoundPolicy, stepper: Stepper,
                 publisher: Publisher, registry: DeviceRegistry, db: StateDB, seal_key: CoordinatorKey,
                 privacy: PrivacyGuard | None, control: RunControl, evaluations: Evaluations, report: Reporter,
                 meta: dict[str, str], serve_metrics: bool, scaffold: ScaffoldServer | None = None) -> None:
        self.config, self.link, self.policy, self.stepper, self.publisher = config, link, policy, stepper, publisher
        self.registry, self.db, self.privacy, self.control = registry, db, privacy, control
        self.evaluations, self.report, self.meta, self.serve_metrics = evaluations, report, meta, serve_metrics
        #: Scaffold's server control variate, else None (coordinator/scaffold.py).
        self.scaffold = scaffold
        self.receiver = BlobReceiver(timeout=policy.receiver_timeout_s, max_size=policy.engine.max_update_bytes)
        self.inbox = Inbox(config, link, queue.SimpleQueue(), self.receiver, registry, db, publisher, seal_key,
                           policy, lambda device, outcome: policy.answered(self, device, outcome), control, report)
        #: The global model, float32 ``(d,)`` (the published one with a compressed downlink).
        self.vector = publisher.module_vector()
        self.version = 0
        self.steps_done = 0

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> RunResult:
        """Run until ``config.rounds`` rounds (server steps) are done or a stop is asked
        (:class:`coordinator.service.Coordinator.run`)."""
        cfg, policy, link = self.config, self.policy, self.link
        try:
            start = resume(cfg, self.db, self.stepper, self.privacy, self.registry, self.meta, self.scaffold)
            self.vector, self.steps_done, self.version = start.vector, start.round, start.version
            self.evaluations.last = start.evaluation
            policy.engine.checks.norms.extend(start.norms)
            self._start_metrics()
            policy.resume(self, start.round, start.version)
            link.connect()
            self.publisher.connects_seen = link.connects
            link.subscribe([topics.status_filter(cfg.federation), topics.update_filter(cfg.federation)],
                           inbox=self.inbox.queue)
            policy.start(self)
            self.publisher.publish_model(self.vector, self.version, self.steps_done)
            while self.steps_done < cfg.rounds and not self.control.stopping:
                if not policy.advance(self):
                    break
                self.evaluations.report_done(wait=False)
            if self.steps_done >= cfg.rounds and not self.control.stopping:
                policy.finish(self)
            self.evaluations.report_done(wait=True)
            return RunResult(self.evaluations.records, self.publisher.module_of(self.vector), self.vector,
                             self.version, stopped=self.steps_done < cfg.rounds)
        finally:
            self._close()

    def _start_metrics(self) -> None:
        """Set the metrics to the resumed model and serve them on ``[metrics]`` when asked."""
        metrics = self.report.metrics
        metrics.started(self.version, *self.evaluations.last)
        if self.privacy is not None:
            metrics.spent(self.privacy.epsilon)
        if self.serve_metrics:
            served = metrics.serve(self.config.metrics.address, self.config.metrics.port)
            log.info("metrics on %s", served.url)

    def _close(self) -> None:
        self.evaluations.close()
        if self.serve_metrics:
            self.report.metrics.close()
        # The last receipts and retained round state leave before the link closes (paho drops
        # what is still queued): bounded, and at once while the broker is unreachable.
        self.link.flush(FLUSH_TIMEOUT_S)
        self.link.close()
        self.inbox.flush_rejections()
        self.db.close()

    # -- what policies use -----------------------------------------------------------------

    def pump(self, timeout: float, notify: bool = True) -> bool:
        """Report finished evaluations, repair the retained state after a reconnect, then
        handle the messages waiting (up to ``timeout`` seconds for the first)."""
        self.evaluations.report_done(wait=False)
        self.publisher.repair(self.vector)
        return self.inbox.drain(timeout, notify)

    def phase_io(self, other: Callable[[Message], None], parse: Callable[[str], tuple[str, str] | None],
                 gone: Callable[[str], bool]) -> PhaseIO:
        """The loop as a phase of several messages sees it (:func:`coordinator.phases.run_phase`)."""
        def receive(timeout: float) -> Message | None:
            self.evaluations.report_done(wait=False)
            self.publisher.repair(self.vector)
            try:
                return self.inbox.queue.get(timeout=timeout)
            except queue.Empty:
                return None

        return PhaseIO(receive=receive, parse=parse, other=other, refuse=lambda r: self.inbox.rejections.update([r]),
                       gone=gone, stopping=lambda: self.control.stopping)

    def wait_for_devices(self, round_: int) -> list[str]:
        """Eligible devices once there are enough: ``devices_to_wait_for``, or after
        ``wait_for_devices_s`` at least ``min_updates`` (a round with fewer cannot succeed,
        so none is opened: the wait goes on, logged every WAIT_LOG_INTERVAL_S). [] on stop."""
        cfg, registry, task = self.config.round, self.registry, self.stepper.task
        end = time.monotonic() + cfg.wait_for_devices_s
        next_log = time.monotonic()
        while not self.control.stopping:
            eligible = registry.eligible(task.name, self.stepper.spec.hash)
            now = time.monotonic()
            needed = max(cfg.min_updates, cfg.devices_to_wait_for if now < end else 0)
            if len(eligible) >= needed:
                return eligible
            if now >= next_log:
                log.info("waiting for devices: %d eligible (%d online), %d needed for round %d", len(eligible),
                         registry.online_count(), needed, round_)
                next_log = now + WAIT_LOG_INTERVAL_S
            self.report(Progress("waiting", round_, online=registry.online_count()))
            self.pump(POLL_S * 5, notify=False)
        return []

    # -- the server step -------------------------------------------------------------------

    def step(self, closed: ClosedRound) -> tuple[RoundRecord, bool]:
        """Take the server step of a closed round (or a flushed buffer): privacy charge, server
        optimizer, checkpoint, database, the policy's clean-up, publication, evaluation.

        Returns:
            The step's record (``test_*`` filled in later, by the evaluation) and whether the
            global model moved (False: the round failed, or the new model was non-finite).
        """
        cfg, control, policy = self.config, self.control, self.policy
        rec = closed.record
        if self.privacy is not None:
            # Charged with the checkpoint below, before the noisy model can be published
            # (coordinator/privacy.py, "When a round is charged").
            eps = (self.privacy.charge(rec.round, rec.accepted) if closed.model_delta is not None
                   else self.privacy.epsilon)
            rec = replace(rec, epsilon=eps)
        stepped, delta_blob = False, None
        if closed.model_delta is not None:
            stepped, delta_blob = self.stepper.step(self.vector, closed.model_delta, rec.model_version, rec.round)
            if not stepped:
                rec = replace(rec, state="failed", model_version=rec.base_version)
                self.inbox.rejections["non_finite_model"] += 1
        if self.scaffold is not None:
            # c moves with the model: the round's control changes are stepped in, or dropped.
            if stepped:
                self.scaffold.step(rec.model_version)
            else:
                self.scaffold.discard()
        rec = replace(rec, test_loss=None, test_accuracy=None,
                      bytes_down=int(sum(p.metrics.get(LINK_BYTES_IN, 0.0) for p in rec.participations)))
        meta = dict(self.meta, norms=json.dumps([round(n, 6) for n in policy.engine.checks.norms]))
        if self.privacy is not None:
            meta["privacy"] = self.privacy.meta()
        meta.update(policy.checkpoint_meta())
        # Durable first (the checkpoint is the source of truth), then visible.
        arrays = self.stepper.optimizer.state_arrays()
        keep = getattr(policy, "checkpoint_arrays", None)  # optional for registered policies
        if keep is not None:
            arrays.update(keep(self.vector, stepped))
        if self.scaffold is not None:
            arrays.update(self.scaffold.state_arrays())
        save_checkpoint(cfg.state_dir, Checkpoint(rec.round, rec.model_version, self.vector, arrays, meta, rec,
                                                  self.stepper.residual),
                        before_rename=lambda: control.pause("checkpoint_write", rec.round))
        control.pause("checkpoint_rename", rec.round)
        control.pause("publishing", rec.round)
        self.db.write_round(rec)
        self.db.write_devices(list(self.registry.devices.values()))
        self.inbox.flush_rejections()
        self.steps_done, self.version = rec.round, rec.model_version
        policy.after_checkpoint(self, rec, stepped)
        if stepped:
            control.pause("model_publish", rec.round)
            self.publisher.publish_or_defer(self.vector, rec.model_version, rec.round, delta_blob)
            control.pause("model_published", rec.round)
        self.evaluations.submit(rec, self.vector if stepped else None)
        return rec, stepped
