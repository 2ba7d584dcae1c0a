"""A test-only round policy of two phases, "announce, then collect": one module plus the
registry line at its end, with no edit to the round driver.

Phase 1 (``announce``): every selected device is sent ``announce:<round>`` on
``fedmq/F/announce/D`` and must answer ``ack:<round>`` (message kind ``ack`` on its phase
topic, :func:`fedmq.wire.topics.secagg_up`) within ``PHASE_S`` seconds; fewer acknowledgements
than ``min_updates`` fail the round. Phase 2 (``collect``): only the devices that
acknowledged get a task; the others are counted as dropped; client updates are collected
as in a plain round. :class:`AckResponder` is the
device side of phase 1 for a set of real edge agents.
"""

from __future__ import annotations

import queue
import threading
import time

from coordinator.phases import Phase, PhaseFailed, Refused, run_phase
from coordinator.policy import PolicyParts, RoundContext, register_policy
from coordinator.synchronous import SyncRounds
from fedmq.wire import topics
from fedmq.fl.rounds import ClosedRound, RoundRecord
from fedmq.transport import Link, Message


NAME = "announce-collect"
#: Seconds the announce phase waits for acknowledgements.
PHASE_S = 2.0


def announce_topic(fed: str, device: str) -> str:
    """Where ``device`` hears the announcement of a round."""
    return f"{topics.ROOT}/{fed}/announce/{device}"


class AnnounceThenCollect:
    """The two phases of a round (module docstring)."""

    def __init__(self, parts: PolicyParts) -> None:
        self.parts = parts
        #: Devices that acknowledged, per round (what the tests check).
        self.acked: dict[int, frozenset[str]] = {}

    def start(self, ctx: RoundContext) -> None:
        self.parts.link.subscribe(topics.secagg_up_filter(self.parts.config.federation), inbox=ctx.inbox.queue)

    def run(self, ctx: RoundContext, rounds: SyncRounds, eligible: int) -> ClosedRound | None:
        fed, engine = self.parts.config.federation, rounds.engine
        r = engine.round
        for device in engine.selection:
            self.parts.link.publish(announce_topic(fed, device), f"announce:{r}".encode())

        def accept(device: str, payload: bytes) -> None:
            if payload != f"ack:{r}".encode():
                raise Refused("stale", f"{payload[:32]!r} is no acknowledgement of round {r}")

        io = ctx.phase_io(ctx.inbox.handle, lambda t: topics.parse_secagg_up(fed, t), lambda d: d in rounds.gone)
        phase = Phase("announce", "ack", frozenset(engine.selection), self.parts.config.round.min_updates,
                      min(engine.deadline, time.time() + PHASE_S))
        try:
            acked = run_phase(phase, io, accept)
        except PhaseFailed:
            if self.parts.control.stopping:
                return None
            acked = frozenset()
        self.acked[r] = acked
        for device in engine.selection:
            if device not in acked:
                engine.drop(device)
        rounds.publish_tasks(ctx, [d for d in engine.selection if d in acked])
        rounds.announce(ctx, eligible)
        if not rounds.collect(ctx):
            return None
        return engine.close(time.time())

    def checkpoint_meta(self) -> dict[str, str]:
        return {}

    def after_checkpoint(self, ctx: RoundContext, rec: RoundRecord, stepped: bool) -> None:
        """Nothing to tell: the round's tasks are cleared by the policy."""


class AckResponder:
    """The device side of the announce phase for ``devices``: answers each announcement on
    its own thread (a real device would do it in its agent)."""

    def __init__(self, link: Link, federation: str, devices: list[str]) -> None:
        self.link, self.fed = link, federation
        self.devices = set(devices)
        self.announced: list[tuple[str, bytes]] = []
        self._inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="ack-responder")

    def __enter__(self) -> AckResponder:
        self.link.subscribe(announce_topic(self.fed, "+"), inbox=self._inbox)
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        prefix = announce_topic(self.fed, "")
        while not self._stop.is_set():
            try:
                msg = self._inbox.get(timeout=0.1)
            except queue.Empty:
                continue
            device = msg.topic[len(prefix):]
            if device in self.devices and msg.payload.startswith(b"announce:"):
                self.announced.append((device, msg.payload))
                self.link.publish(topics.secagg_up(self.fed, device, "ack"),
                                  b"ack:" + msg.payload[len(b"announce:"):])


register_policy(NAME, lambda parts: SyncRounds(parts, AnnounceThenCollect(parts)))
