"""Settlement of a device's client updates: the update in flight, the coordinator's receipt
(commit or roll back), resends of the same bytes, and which task the device takes next.

The coordinator is the one authority on whether a transfer was aggregated: with no receipt
the device sends the same update again (same bytes, same transfer id) after
``receipt_timeout`` seconds, at once after every reconnect to the broker, when a task of a
later round or a rerun of the same round arrives, and at the round's deadline plus
``receipt_grace``; it never rolls back on its own guess (docs/edge-client.md, steps 3-4).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

import numpy as np

from edge_client.config import EdgeConfig
from edge_client.connection import Connection
from edge_client.sdnotify import Notifier
from edge_client.state import DeviceState, InFlight
from fedmq.wire import topics
from fedmq.codecs import decode
from fedmq.wire.envelope import decode_update
from fedmq.errors import TransportError
from fedmq.fl.feedback import ErrorFeedback
from fedmq.wire.messages import Receipt, RoundTask
from fedmq.model.params import ParamSpec

# The agent's parts log under the agent's name: one logger for an operator to filter.
log = logging.getLogger("edge_client.agent")

#: Seconds one publish of a whole update may take before it is retried later.
SEND_TIMEOUT = 30.0
#: Tasks (round, deadline) remembered to tell a task seen again from a new one.
TASKS_SEEN = 64


class Settlement:
    """The update in flight of one device, and the task that waits for it to settle.

    Args:
        cfg: ``receipt_timeout``, ``receipt_grace`` (seconds), ids.
        conn: the connection (its sender publishes the update).
        state: the durable state (the update in flight, the residual, the ledger).
        feedback: the error-feedback memory (a rolled-back update goes back into its residual).
        spec: the model's ParamSpec (to decode what was sent).
        counters: ``resends``, ``accepted``, ``rejected``, ``rolled_back``, ``repairs``.
        notifier: systemd status after a receipt.
        pause: the test hook, called ``("receipt", round)`` before a receipt is applied.

    Attributes:
        pending: the newest task that arrived while an update was in flight (it waits for the
            coordinator's answer), or None.
    """

    def __init__(self, cfg: EdgeConfig, conn: Connection, state: DeviceState, feedback: ErrorFeedback,
                 spec: ParamSpec, counters: Counter[str], notifier: Notifier,
                 pause: Callable[[str, int], None]) -> None:
        self.cfg, self.conn, self.state, self.feedback, self.spec = cfg, conn, state, feedback, spec
        self.counters, self.notifier, self.pause = counters, notifier, pause
        self.pending: RoundTask | None = None
        self._tasks_seen: set[tuple[int, float]] = set()
        self._last_send = 0.0
        self._asked_after_deadline = False

    # -- tasks ----------------------------------------------------------------------------

    def on_task(self, task: RoundTask) -> None:
        """A task for this device: resend what is in flight when the task says the coordinator
        may not have it; otherwise keep the task for :meth:`take_pending` if it is wanted."""
        rec = self.state.record
        inflight, settled = rec.inflight, rec.settled
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
                    self.send()
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
            self.send()
            return
        if settled is not None and task.round == settled.round and task.deadline > rec.last_deadline \
                and task.model_version == settled.base_version:
            # Same round, later deadline: the coordinator crashed before it checkpointed the
            # round and lost the update it had accepted from us. Send the same bytes again.
            log.info("round %d is being rerun by the coordinator: sending its accepted update again", task.round)
            self.state.reopen(task.deadline)
            self.counters["resends"] += 1
            self.send()
            return
        if not self.wants(task):
            log.debug("task for round %d ignored: already done", task.round)
            return
        if task.round == rec.last_round:
            log.info("round %d is being rerun by the coordinator: training again", task.round)
        self._keep_pending(task)

    def take_pending(self) -> RoundTask | None:
        """The task kept for later, once no update is in flight (then it is no longer kept)."""
        if self.pending is None or self.state.record.inflight is not None:
            return None
        task, self.pending = self.pending, None
        return task

    def wants(self, task: RoundTask) -> bool:
        """True when ``task`` is for a round this device has not done (or a rerun of its last)."""
        rec = self.state.record
        return task.round > rec.last_round or (task.round == rec.last_round and task.deadline > rec.last_deadline)

    def _seen_task(self, task: RoundTask) -> bool:
        """True when this very task (round, deadline) arrived before in this run."""
        key = (task.round, task.deadline)
        seen = key in self._tasks_seen
        if len(self._tasks_seen) >= TASKS_SEEN:
            self._tasks_seen.clear()
        self._tasks_seen.add(key)
        return seen

    def _keep_pending(self, task: RoundTask) -> None:
        if self.pending is None or (task.round, task.deadline) >= (self.pending.round, self.pending.deadline):
            self.pending = task

    # -- the update in flight -------------------------------------------------------------

    def resume(self) -> None:
        """At start, once the receipts kept in the session are handled: ask again about the
        last accepted update, and send the update in flight again."""
        rec = self.state.record
        if rec.inflight is None and rec.settled is not None:
            # The last accepted update may have been accepted by a coordinator that died
            # before its checkpoint, and rerun while we were away: ask (the coordinator
            # answers with what its database says) instead of assuming it was aggregated.
            self.state.reopen(rec.settled.deadline)
        inflight = self.state.record.inflight
        if inflight is not None:
            log.info("round %d: sending the update left in flight by the last run again (transfer %s)",
                     inflight.round, inflight.transfer_id)
            self.send()

    def after_reconnect(self) -> None:
        """The broker may have restarted and lost what we sent: ask again now instead of
        after ``receipt_timeout``."""
        if self.state.record.inflight is not None:
            self.counters["resends"] += 1
            self.send()

    def check(self) -> None:
        """The clocks of the update in flight: a resend after ``receipt_timeout`` seconds, and
        once at the deadline plus ``receipt_grace``."""
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
            self.send()
        elif time.monotonic() - self._last_send >= self.cfg.receipt_timeout:
            self.counters["resends"] += 1
            self.send()

    def begin(self, data: bytes, task: RoundTask, *, transfer_id: str, with_feedback: bool,
              sealed: bytes | None) -> InFlight:
        """Commit a new client update (envelope ``data``; ``sealed``: what goes on the wire
        when sealed) with the residual that holds once it is sent; not yet published."""
        return self.state.begin_update(self.feedback, data, round=task.round, transfer_id=transfer_id,
                                       base_version=task.model_version, deadline=task.deadline,
                                       with_feedback=with_feedback, sealed=sealed)

    def send(self) -> None:
        """(Re)publish the committed update: the same bytes under the same transfer id (a
        failed publish is logged and retried after ``receipt_timeout``)."""
        inflight = self.state.record.inflight
        if inflight is None:
            return
        self._last_send = time.monotonic()
        if time.time() <= inflight.deadline + self.cfg.receipt_grace:
            self._asked_after_deadline = False
        try:
            # The manifest names the round, so a refusal decided before the blob is assembled
            # still names this update's round (and settles it).
            self.conn.sender.send(self._base(inflight.transfer_id), self.state.read_wire(), timeout=SEND_TIMEOUT,
                                  round_=inflight.round)
        except TransportError as exc:
            log.warning("round %d: publishing the update failed (%s); retried in %.0f s", inflight.round, exc,
                        self.cfg.receipt_timeout)

    def on_transfer_request(self, payload: bytes) -> None:
        """The coordinator asks for chunks of a transfer again: resend them.

        Raises: WireError (malformed request), TransportError (the resend failed)."""
        if self.conn.sender.handle_request(payload, timeout=SEND_TIMEOUT):
            self.counters["repairs"] += 1

    def on_receipt(self, receipt: Receipt) -> None:
        """The coordinator's answer: ``accepted`` commits the update in flight; a rejection puts
        what was sent back into the residual. A receipt for another transfer is ignored."""
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
        self.pause("receipt", inflight.round)
        self.conn.sender.acknowledge(self._base(inflight.transfer_id))
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

    def _rollback(self, reason: str) -> None:
        self.state.rollback(self.feedback, self._sent_vector(self.state.read_inflight()), reason)
        self.counters["rolled_back"] += 1

    def _sent_vector(self, data: bytes) -> np.ndarray:
        update = decode_update(data, self.spec)
        return decode(update.codec, update.payload, self.spec)

    def _base(self, transfer_id: str) -> str:
        return topics.update_base(self.cfg.federation, self.cfg.device_id, transfer_id)
