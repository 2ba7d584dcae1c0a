"""Secure rounds inside the device agent: their inbox, the input handed over from local
training, and its durable settlement into the residual (the protocol itself:
:mod:`edge_client.secure`).

Until a secure round's result, the whole of the residual plus the round's update stays in the
residual; just before the masked input goes out, the residual without what it stands for is
made durable with the pending input (``secagg-pending.npz``), so a device killed after that
settles it by the retained result when it comes back.
"""

from __future__ import annotations

import logging
import queue
import time
from collections import Counter
from collections.abc import Callable

import numpy as np

from edge_client.config import EdgeConfig
from edge_client.connection import Connection
from edge_client.secure import ACTIVE_AFTER_DEADLINE_S, Pending, SecureDevice, clear_pending, load_pending, save_pending
from edge_client.state import DeviceState
from fedmq.fl.feedback import ErrorFeedback
from fedmq.wire.messages import RoundTask
from fedmq.transport import Message

log = logging.getLogger("edge_client.agent")

#: Wait of the agent's loop while a secure round of this device runs, seconds (each of the
#: round's phases waits for it once).
SECURE_TICK = 0.02


class SecureRounds:
    """The agent's side of :class:`edge_client.secure.SecureDevice`.

    Construction settles nothing: an input left unsettled by the last run is loaded (its
    residual replaces ``feedback.residual``) and is settled by the retained result.

    Args:
        cfg: ids and ``state_dir``.
        conn: the connection the secure messages go out on.
        state, feedback: the durable state and the error-feedback memory.
        size: the flat model's length.
        counters: ``updates_sent``, ``accepted``, ``rolled_back``, and the refusals
            ``secagg_<reason>``.
        pause: the test hook (``secagg_*`` points, edge_client.secure).

    Attributes:
        inbox: where the link puts the messages of ``topics.secagg_down``.
        device: the protocol's state machine.

    Raises:
        StateError: the pending input in the state folder is unreadable.
    """

    def __init__(self, cfg: EdgeConfig, conn: Connection, state: DeviceState, feedback: ErrorFeedback, *,
                 size: int, counters: Counter[str], pause: Callable[[str, int], None]) -> None:
        self.cfg, self.state, self.feedback, self.counters = cfg, state, feedback, counters
        self.inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
        left = load_pending(cfg.state_dir, size)
        if left is not None:
            feedback.residual = left[1]
        self.device = SecureDevice(cfg.federation, cfg.device_id, conn, size=size, settle=self._settle,
                                   sent=self._sent, pending=left[0] if left is not None else None,
                                   refused=counters, pause=pause)
        self._task: RoundTask | None = None

    def expect(self, task: RoundTask, last_round: int) -> None:
        """A task arrived: a secure round's task of a round not yet done makes the loop answer
        its phases promptly (:meth:`tick_s`)."""
        if task.secure_aggregation and task.round > last_round:
            self._task = task

    def holds_input(self, task: RoundTask) -> bool:
        """``task`` reruns a secure round whose input this device still holds (the coordinator
        restarted before the round's result): no second training; the held input goes into
        the new attempt once its setup rolls the old one back."""
        return task.secure_aggregation and self.device.holds(task.round)

    def tick_s(self, default: float) -> float:
        """The loop's wait: :data:`SECURE_TICK` while a secure round of this device runs (its
        messages come on their own inbox, looked at once per wait), ``default`` otherwise."""
        task = self._task
        waiting = task is not None and time.time() < task.deadline + ACTIVE_AFTER_DEADLINE_S
        return SECURE_TICK if waiting or self.device.active else default

    def drain(self) -> None:
        """Handle every secure message received so far."""
        while True:
            try:
                msg = self.inbox.get_nowait()
            except queue.Empty:
                return
            if msg.payload:
                self.device.handle(msg.payload)

    def provide(self, task: RoundTask, update: np.ndarray) -> bool:
        """Hand the residual plus ``update`` (float32 ``(size,)``) to the round; until its
        result the whole of it is in the residual (the round is done: no second update for
        it). False, with nothing changed, when that sum is not finite."""
        vector = self.feedback.residual + np.asarray(update, dtype=np.float32)
        if not np.isfinite(vector).all():
            return False
        self.feedback.residual = vector.copy()
        self.state.save_residual(self.feedback, task.round, task.deadline)
        self._task = task
        self.drain()
        self.device.provide(task.round, vector)
        self.counters["updates_sent"] += 1
        return True

    def _sent(self, pending: Pending) -> None:
        """The masked input is about to go out: durably, the residual without it."""
        residual = self.feedback.residual - pending.sent
        save_pending(self.cfg.state_dir, pending, residual)
        self.feedback.residual = residual
        task = self._task
        self.state.save_residual(self.feedback, pending.round, task.deadline if task is not None else 0.0)

    def _settle(self, pending: Pending, in_sum: bool) -> None:
        self._task = None
        if in_sum:
            self.counters["accepted"] += 1
        else:
            self.feedback.rollback(pending.sent)
            self.counters["rolled_back"] += 1
        self.state.save_residual(self.feedback, pending.round, self.state.record.last_deadline)
        clear_pending(self.cfg.state_dir)
