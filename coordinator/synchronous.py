"""Synchronous rounds: who takes part in a round, its phases, and what an offline device means.

A round ``r`` (:class:`SyncRounds`): wait for ``round.min_devices`` eligible devices (after
``round.wait_for_devices_s``, ``min_updates`` are enough; with fewer no round opens);
select ``ceil(target * over_selection)`` of them with the generator of ``(seed, r)`` (under
differential privacy the guard selects and may refuse to open the round); open the engine
(:class:`fedmq.fl.rounds.RoundEngine`); run the round's phases (:class:`RoundPhases`: the
plain round has one, :class:`CollectUpdates`, which sends each device a retained
:class:`fedmq.wire.messages.RoundTask`, announces the round and accepts client updates until
``target`` are accepted, every selected device has answered or dropped, or the deadline
passes); hand the closed round to the driver's server step. A selected device whose
offline status arrives is counted as dropped once ``round.drop_grace_s`` pass without it
coming back. Retained tasks are cleared once the round is checkpointed.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

import numpy as np

from coordinator.policy import PolicyParts, RoundContext, register_policy, warmed_plan
from coordinator.progress import Progress
from fedmq.wire import topics
from fedmq.fl.rounds import Accepted, ClosedRound, Outcome, RoundEngine, RoundRecord
from fedmq.fl.sampling import select_devices
from fedmq.wire.messages import RoundAnnouncement, RoundTask, TrainPlan
from fedmq.transport.flows import request_repairs


log = logging.getLogger("fedmq.coordinator")


class RoundPhases(Protocol):
    """The phases of one synchronous round, between selection and the server step."""

    def start(self, ctx: RoundContext) -> None:
        """Connected and subscribed (subscribe to the phases' messages, tell a result again)."""

    def run(self, ctx: RoundContext, rounds: SyncRounds, eligible: int) -> ClosedRound | None:
        """Run the open round's phases (``rounds.engine`` is open for the selection); the closed
        round, or None on a stop request."""

    def checkpoint_meta(self) -> dict[str, str]:
        """Metadata kept with the round's checkpoint."""

    def checkpoint_arrays(self, vector: np.ndarray, stepped: bool) -> dict[str, np.ndarray]:
        """Float32 ``(d,)`` arrays kept with the round's checkpoint (see RoundPolicy).
        Optional: phases without it keep none."""

    def after_checkpoint(self, ctx: RoundContext, rec: RoundRecord, stepped: bool) -> None:
        """The round is durable, its tasks cleared; before the round's announcement."""


class SyncRounds:
    """The synchronous round policy (module docstring) over the phases ``phases``.

    Args:
        parts: the coordinator's parts (:class:`coordinator.policy.PolicyParts`).
        phases: the round's phases.
    """

    def __init__(self, parts: PolicyParts, phases: RoundPhases) -> None:
        cfg = parts.config
        self.parts, self.config, self.phases = parts, cfg, phases
        privacy = parts.privacy
        self.engine = RoundEngine(
            cfg.federation, parts.spec, kind=cfg.plan.update_kind, is_known=lambda d: d in parts.registry.devices,
            max_update_bytes=parts.update_limit,
            aggregator=cfg.aggregation.rule if privacy is None else privacy.aggregator,
            min_updates=cfg.round.min_updates, checks=parts.checks, lookup=parts.db.transfer_outcome,
            aggregator_options=cfg.aggregation.options())
        self.receiver_timeout_s = max(10.0, cfg.round.deadline_s)
        #: Selected devices of the open round that went offline before answering, with the
        #: time.monotonic() they did: dropped after ``round.drop_grace_s`` unless back online.
        self.gone: dict[str, float] = {}

    @property
    def round_in_progress(self) -> int:
        return self.engine.round

    def resume(self, ctx: RoundContext, step: int, version: int) -> None:
        self.engine.round, self.engine.base_version = step, version

    def start(self, ctx: RoundContext) -> None:
        """Clear retained tasks left by a round that was in flight when we were killed."""
        for device in self.parts.db.inflight_devices():
            self.parts.link.publish(topics.task(self.config.federation, device), b"", retain=True)
        self.parts.db.set_inflight([])
        self.phases.start(ctx)

    # -- one round ---------------------------------------------------------------------------

    def advance(self, ctx: RoundContext) -> bool:
        cfg, engine, control = self.config, self.engine, self.parts.control
        r = engine.round + 1
        eligible = ctx.wait_for_devices(r)
        if control.stopping:
            return False
        policy = cfg.round.participation()
        privacy = self.parts.privacy
        if privacy is not None:
            selected, target = privacy.select(eligible, r)
            if not privacy.admits(r):
                self.parts.db.set_stopped(r, privacy.exhausted, time.time())
                control.stop()
                return False
        else:
            selected = select_devices(eligible, policy, cfg.seed, r)
            target = min(policy.target(len(eligible)), len(selected)) if selected else policy.target(len(eligible))
        started = time.time()
        deadline = started + cfg.round.deadline_s
        control.pause("selection", r)
        self.parts.db.set_inflight(selected)
        self.gone.clear()
        engine.open(r, ctx.version, selected, target, deadline, started)
        closed = self.phases.run(ctx, self, len(eligible))
        if closed is None:
            return False
        ctx.step(closed)
        return True

    def plan(self) -> TrainPlan:
        """The open round's train plan: density warm-up, the privacy guard's clip norm and noise."""
        plan = warmed_plan(self.config, self.engine.round)
        if self.parts.privacy is not None:
            plan = self.parts.privacy.plan(plan)
        return plan

    def publish_tasks(self, ctx: RoundContext, devices: list[str], *, secure: bool = False) -> None:
        """Send each of ``devices`` its retained task for the open round."""
        engine, plan = self.engine, self.plan()
        for i, device in enumerate(devices):
            task = RoundTask(self.config.federation, device, engine.round, engine.base_version, self.parts.spec.hash,
                        engine.deadline, plan, ctx.publisher.published_sha, secure_aggregation=secure)
            ctx.publisher.publish_retained(topics.task(self.config.federation, device), task.to_bytes())
            if i == 0:
                self.parts.control.pause("task_publish", engine.round)

    def announce(self, ctx: RoundContext, eligible: int) -> None:
        """Announce the open round (retained) and report it open."""
        engine = self.engine
        ctx.publisher.publish_retained(topics.round_announcement(self.config.federation),
                                       RoundAnnouncement(engine.round, engine.base_version, engine.deadline,
                                                         "open").to_bytes())
        log.info("round %d: %d eligible, %d selected, target %d, deadline in %.1f s", engine.round, eligible,
                 len(engine.selection), engine.target, self.config.round.deadline_s)
        ctx.report(Progress("round_open", engine.round, len(engine.selection), engine.target,
                            deadline=engine.deadline, online=self.parts.registry.online_count()))

    def collect(self, ctx: RoundContext) -> bool:
        """Accept client updates until the round is complete or its deadline; False on a stop request."""
        engine, control = self.engine, self.parts.control
        while not control.stopping and not engine.complete:
            remaining = engine.deadline - time.time()
            if remaining <= 0:
                break
            ctx.pump(min(ctx.poll_s, remaining))
            request_repairs(self.parts.link, self.config.federation, ctx.receiver)
            self._drop_gone()
        return not control.stopping

    # -- devices -----------------------------------------------------------------------------

    def presence(self, device: str, online: bool) -> None:
        """An offline selected device that has not answered is counted as dropped once
        ``round.drop_grace_s`` pass without it coming back (at once when 0), not at the deadline."""
        if online:
            self.gone.pop(device, None)
            return
        engine = self.engine
        if not engine.is_open or device not in engine.selected or device in engine.answered:
            return
        if device not in self.gone:
            self.gone[device] = time.monotonic()
            log.info("round %d: %s went offline before answering", engine.round, device)
        self._drop_gone()

    def _drop_gone(self) -> None:
        """Count as dropped the devices offline for ``round.drop_grace_s`` or more."""
        now, grace = time.monotonic(), self.config.round.drop_grace_s
        for device, since in list(self.gone.items()):
            if now - since >= grace:
                del self.gone[device]
                if self.engine.drop(device):
                    log.info("round %d: %s did not come back within %.0f s: dropped", self.engine.round, device,
                             grace)

    def before_receipt(self, device: str, transfer: str, outcome: Accepted) -> None:
        """Nothing to keep: a round killed before its checkpoint is rerun."""

    def answered(self, ctx: RoundContext, device: str, outcome: Outcome) -> None:
        """Nothing to do: the round's loop sees :attr:`fedmq.fl.rounds.RoundEngine.complete`."""

    def progress(self) -> Progress:
        engine = self.engine
        return Progress("update", engine.round, len(engine.selection), engine.target, engine.aggregate.count,
                        sum(engine.rejected.values()), engine.deadline)

    # -- the step ------------------------------------------------------------------------------

    def checkpoint_meta(self) -> dict[str, str]:
        return self.phases.checkpoint_meta()

    def checkpoint_arrays(self, vector: np.ndarray, stepped: bool) -> dict[str, np.ndarray]:
        # Optional for phases (added after the protocol was published): none means no arrays.
        arrays = getattr(self.phases, "checkpoint_arrays", None)
        return arrays(vector, stepped) if arrays is not None else {}

    def after_checkpoint(self, ctx: RoundContext, rec: RoundRecord, stepped: bool) -> None:
        """Clear the round's tasks, let the phases tell their result, announce the round's end."""
        publisher, fed = ctx.publisher, self.config.federation
        publisher.forget_cleared()
        for device in self.engine.selection:
            publisher.publish_retained(topics.task(fed, device), b"")
        self.parts.db.set_inflight([])
        self.phases.after_checkpoint(ctx, rec, stepped)
        publisher.publish_retained(topics.round_announcement(fed),
                                   RoundAnnouncement(rec.round, rec.base_version, self.engine.deadline,
                                                     rec.state).to_bytes())

    def finish(self, ctx: RoundContext) -> None:
        """Nothing left: every round cleared its tasks when it closed."""


class CollectUpdates:
    """The one phase of a plain round: tasks out, client updates in (module docstring)."""

    def start(self, ctx: RoundContext) -> None:
        """No phase messages to subscribe to."""

    def run(self, ctx: RoundContext, rounds: SyncRounds, eligible: int) -> ClosedRound | None:
        rounds.publish_tasks(ctx, rounds.engine.selection)
        rounds.announce(ctx, eligible)
        if not rounds.collect(ctx):
            return None
        return rounds.engine.close(time.time())

    def checkpoint_meta(self) -> dict[str, str]:
        return {}

    def checkpoint_arrays(self, vector: np.ndarray, stepped: bool) -> dict[str, np.ndarray]:
        return {}

    def after_checkpoint(self, ctx: RoundContext, rec: RoundRecord, stepped: bool) -> None:
        """No result to tell."""


register_policy("sync", lambda parts: SyncRounds(parts, CollectUpdates()))
