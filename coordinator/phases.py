"""One phase of a round: small messages of one kind, each device's once, until a deadline and a quorum.

:func:`run_phase` is the phase runner the round policies share (the round driver's
:meth:`coordinator.driver.RoundDriver.phase_io` is its view of the loop); a protocol of
several phases (secure aggregation: :mod:`coordinator.secure`; the test-only "announce, then
collect", ``tests/coordinator/announce_policy.py``) says, for each phase, who is expected,
what to do with one message (``accept``) and what to send when the phase closes.
A phase ends when every expected device that is still online has answered, or at its
deadline; with fewer answers than its quorum it fails (:class:`PhaseFailed`) and the round
with it. Messages that belong to no phase of this driver (statuses, client updates) go to
``other`` so the coordinator's usual handling goes on during a phase.

Every refusal (a message of another phase, a device not expected, a second answer, one that
does not decode or that the policy refuses) is logged with its reason and counted through
``refuse``; it never ends the phase.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from fedmq.errors import FedmqError, WireError
from fedmq.transport import Message

log = logging.getLogger("fedmq.coordinator.phases")


class PhaseFailed(FedmqError):
    """Fewer devices answered a phase than its quorum before its deadline (the round fails)."""


class Refused(FedmqError):
    """A policy's refusal of one message: ``reason`` is counted, the message logged."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class Phase:
    """One phase.

    Attributes:
        name: for logs and refusals (``keys``, ``shares``, ``input``, ``reveal``).
        kind: the message kind the phase accepts (the last level of the device's topic).
        expected: the devices that should answer.
        quorum: fewest answers for the phase to succeed.
        deadline: when the phase closes at the latest, wall-clock seconds since the epoch.
    """

    name: str
    kind: str
    expected: frozenset[str]
    quorum: int
    deadline: float


@dataclass
class PhaseIO:
    """How the driver reaches the coordinator's loop.

    Attributes:
        receive: the next message within ``timeout`` seconds, or None.
        parse: ``(device, kind)`` of a phase message's topic, None for any other message.
        other: handles any other message (statuses, client updates) as the coordinator does.
        refuse: counts one refusal by reason.
        gone: whether a device is known to be offline (a phase does not wait for it).
        stopping: whether the coordinator is asked to stop (the phase ends at once, failed).
        clock: wall-clock seconds since the epoch.
    """

    receive: Callable[[float], Message | None]
    parse: Callable[[str], tuple[str, str] | None]
    other: Callable[[Message], None]
    refuse: Callable[[str], None]
    gone: Callable[[str], bool] = lambda _d: False
    stopping: Callable[[], bool] = lambda: False
    clock: Callable[[], float] = time.time


#: Longest single wait on the inbox, seconds (bounds how late a stop request is seen).
POLL_S = 0.2


def run_phase(phase: Phase, io: PhaseIO, accept: Callable[[str, bytes], None],
              enough: Callable[[frozenset[str]], bool] | None = None) -> frozenset[str]:
    """Run one phase: hand each of its messages to ``accept`` until it closes.

    Args:
        phase: the phase.
        io: the coordinator's loop.
        accept: takes ``(device, payload)`` of an expected device's first message of the
            phase's kind; raises :class:`Refused` or :class:`fedmq.errors.WireError` to refuse it
            (the device may send again).
        enough: given the devices accepted so far, whether the phase may close before every
            expected device answered (default: it may not).

    Returns:
        The devices whose message was accepted.

    Raises:
        PhaseFailed: fewer than ``phase.quorum`` accepted at the deadline, or a stop request.
    """
    answered: set[str] = set()
    while not io.stopping():
        waiting = {d for d in phase.expected - answered if not io.gone(d)}
        remaining = phase.deadline - io.clock()
        if not waiting or remaining <= 0 or (enough is not None and enough(frozenset(answered))):
            break
        msg = io.receive(min(POLL_S, remaining))
        if msg is None:
            continue
        parsed = io.parse(msg.topic)
        if parsed is None:
            io.other(msg)
            continue
        device, kind = parsed
        reason = ("retained" if msg.retain else "out_of_phase" if kind != phase.kind
                  else "not_expected" if device not in phase.expected
                  else "duplicate" if device in answered else None)
        if reason is None:
            try:
                accept(device, msg.payload)
            except Refused as exc:
                reason = exc.reason
                log.info("phase %s: message of %s refused: %s", phase.name, device, exc)
            except WireError as exc:
                reason = "malformed"
                log.info("phase %s: message of %s refused: %s", phase.name, device, exc)
            else:
                answered.add(device)
                continue
        else:
            log.info("phase %s: %s message of %s refused: %s", phase.name, kind[:64], device, reason)
        io.refuse(f"secagg_{reason}")
    if io.stopping() or len(answered) < phase.quorum:
        raise PhaseFailed(f"phase {phase.name}: {len(answered)} of {len(phase.expected)} devices answered, "
                          f"{phase.quorum} needed")
    return frozenset(answered)
