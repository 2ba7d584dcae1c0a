"""Buffered asynchronous aggregation (FedBuff): the pure engine.

FedBuff (Nguyen et al., AISTATS 2022, "Federated Learning with Buffered Asynchronous
Aggregation", arXiv 2106.06639): devices train whenever they are available, each from the
newest global model it holds; the server keeps a buffer of accepted client updates and
steps the global model once the buffer holds ``K`` of them. An update trained from model
version ``b`` and received when the global model is at version ``v`` has staleness
``s = v - b`` and enters the buffer discounted by the polynomial staleness weight

    w(s) = 1 / (1 + s) ** a                (the paper uses a = 0.5)

The buffer's model change is ``sum_i n_i w(s_i) u_i / sum_i n_i`` (``n_i`` the update's
sample count): the sample-weighted mean of the paper, with each update discounted by its
staleness, so a buffer of stale updates moves the model less than a fresh one. The server
optimizer then steps with it exactly as after a synchronous round
(:mod:`fedmq.fl.server_opt`).

Nothing is rejected for arriving late. An update staler than ``max_staleness`` is
rejected with reason ``stale``: its receipt makes the device put it back into its residual
(error feedback keeps what it learned for its next update).

Checks of :meth:`BufferedEngine.offer`, in order (the first that fails is the reason):
``oversized``, ``spec_mismatch``, ``malformed``, ``device_mismatch``, ``unknown_device``,
``finished`` (the last server step, ``max_steps``, is done: the update can count nowhere),
``wrong_base_version`` (trained from a version newer than the global model),
``duplicate`` (a second, different update of the device for the same task round),
``stale``, then the claim and content checks of the synchronous engine, the same
:class:`fedmq.fl.rounds.UpdateChecks` object type (``malformed`` kind or sample count,
``over_weighted``, ``non_finite``, ``norm_bound`` with the data-set bound: a multiple of the
median norm of recent accepted updates). A resend of a transfer already judged is a
:class:`fedmq.fl.rounds.Repeat` with the first answer, also after the buffer it went into
was flushed.

Every rejection names the round of the update's task (the one its receipt must name for the
device to match it): the envelope's round once it decodes, else the round of the task the
coordinator says the device holds (``task_round_of``), else the step in progress. So an
update that arrives after the last step is decoded before it is refused as ``finished``: the
device matches the receipt, rolls the update back into its residual and stops resending.

Each flush produces a :class:`fedmq.fl.rounds.RoundRecord` (``round`` = the server step,
``target`` = ``K``), so the coordinator's database, reports and checkpoints are the same
as in synchronous mode. Participations carry the metric ``task_round`` (the round the
update's task named, which its receipt names too) and accepted ones ``staleness``; the
record's ``device_metrics`` has their sample-weighted means.

The engine is pure (no clock, broker or files) and owned by one thread.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedmq.errors import ConfigError
from fedmq.fl.aggregation import Aggregator, make_aggregator, model_delta
from fedmq.fl.rounds import Accepted, ClosedRound, Outcome, ParticipationRecord, Rejected, Repeat, RoundRecord
from fedmq.fl.rounds import CONTENT_REASONS, ENVELOPE_REASONS, Tally, UpdateChecks, read_envelope
from fedmq.model.params import ParamSpec

#: Every reason the buffered engine refuses a client update for, in the order of its checks.
REASONS = ENVELOPE_REASONS + ("finished", "wrong_base_version", "duplicate", "stale") + CONTENT_REASONS

#: Transfers whose answer is remembered to answer resends (oldest forgotten first).
ANSWER_HISTORY = 100_000


@dataclass(frozen=True)
class StalenessPolicy:
    """How staleness discounts an update (FedBuff's polynomial weight).

    Attributes:
        exponent: ``a`` in ``w(s) = 1 / (1 + s) ** a``; default 0.5, the paper's choice;
            0 gives every update the same weight.
        max_staleness: largest staleness ``s`` (server steps between the model version an
            update was trained from and the version it arrives at) that is accepted;
            default 20; staler updates are rejected as ``stale``.
    """

    exponent: float = 0.5
    max_staleness: int = 20

    def __post_init__(self) -> None:
        if not (math.isfinite(self.exponent) and self.exponent >= 0):
            raise ConfigError(f"staleness exponent must be a finite number >= 0, got {self.exponent}")
        if self.max_staleness < 0:
            raise ConfigError(f"max_staleness must be >= 0, got {self.max_staleness}")

    def weight(self, staleness: int) -> float:
        """``1 / (1 + staleness) ** exponent`` for ``0 <= staleness``."""
        if staleness < 0:
            raise ValueError(f"staleness must be >= 0, got {staleness}")
        return 1.0 / (1.0 + staleness) ** self.exponent


@dataclass(frozen=True)
class Buffered:
    """One accepted update waiting in the buffer (``weight`` = samples x staleness weight)."""

    device: str
    transfer_id: str
    round: int
    samples: int
    staleness: int
    weight: float


class BufferedEngine:
    """The buffer of FedBuff and the answers to client updates.

    Args:
        federation: federation id (envelopes naming another are ``malformed``).
        spec: ParamSpec of the global model.
        kind: update kind the plan asks for (``delta`` or ``gradient``).
        is_known: tells whether a device id was ever seen (the presence registry).
        max_update_bytes: largest client-update blob accepted (bytes).
        buffer_size: ``K``, accepted updates per server step (>= 1).
        staleness: the staleness weight and the maximum staleness.
        checks: the claim and content checks with their norm history
            (:class:`fedmq.fl.rounds.UpdateChecks`, as the synchronous engine's; default: no
            sample cap beyond 2**31 - 1, no norm bound).
        aggregator: aggregation rule of the buffer (:func:`fedmq.fl.aggregation.make_aggregator`).
        aggregator_options: the rule's options (``[aggregation]``; each rule takes its own).
        step: server steps done so far (a resumed coordinator's last step).
        version: the global model version now.
        started: when the first buffer started filling (seconds since the epoch; recorded).
        max_steps: the last server step; later updates are rejected as ``finished`` (None: no end).
        task_round_of: the round of the task a device holds (None: none known), named by the
            receipt of a transfer refused before its envelope could be read.

    Raises:
        ConfigError: unknown aggregation rule, ``buffer_size`` < 1.
    """

    def __init__(self, federation: str, spec: ParamSpec, *, kind: str, is_known: Callable[[str], bool],
                 max_update_bytes: int, buffer_size: int, staleness: StalenessPolicy = StalenessPolicy(),
                 checks: UpdateChecks | None = None, aggregator: str = "weighted-mean", step: int = 0,
                 version: int = 0, started: float = 0.0, max_steps: int | None = None,
                 task_round_of: Callable[[str], int | None] = lambda d: None,
                 aggregator_options: Mapping[str, Any] | None = None) -> None:
        if buffer_size < 1:
            raise ConfigError(f"buffer_size must be >= 1, got {buffer_size}")
        self.federation = federation
        self.spec = spec
        self.kind = kind
        self.is_known = is_known
        self.max_update_bytes = max_update_bytes
        self.buffer_size = buffer_size
        self.staleness = staleness
        self.checks = checks if checks is not None else UpdateChecks()
        self.task_round_of = task_round_of
        self.aggregator_name = aggregator
        self.aggregator_options = dict(aggregator_options or {})
        self.step = step
        self.version = version
        self.max_steps = max_steps
        self._answers: OrderedDict[tuple[str, str], tuple[str, str, int]] = OrderedDict()
        self._rounds_sent: dict[str, tuple[int, str]] = {}   # device -> (task round, transfer) of its last answer
        self._start_buffer(started)

    def _start_buffer(self, started: float) -> None:
        self.aggregate: Aggregator = make_aggregator(self.aggregator_name, self.spec.size, self.aggregator_options)
        self.buffer: list[Buffered] = []
        self.samples = 0
        self.discounted = 0.0
        self.started = started
        self.tally = Tally()
        self.parts: list[ParticipationRecord] = []

    @property
    def rejected(self) -> dict[str, int]:
        """Rejections since the buffer started filling, by reason."""
        return self.tally.rejected

    @property
    def ready(self) -> bool:
        """True once the buffer holds ``buffer_size`` updates (time for :meth:`flush`)."""
        return len(self.buffer) >= self.buffer_size

    def count_bytes(self, device: str, transfer_id: str, n: int) -> None:
        """Count ``n`` bytes of a client-update message received into the current buffer."""
        self.tally.count_bytes(device, transfer_id, n)

    def remember(self, device: str, transfer_id: str, status: str, reason: str, round_: int) -> None:
        """Restore the answer given to a transfer before a restart (from the database), so a
        resend of it gets the same answer."""
        self._remember(device, transfer_id, (status, reason, round_))

    def _remember(self, device: str, transfer_id: str, answer: tuple[str, str, int]) -> None:
        self._answers[(device, transfer_id)] = answer
        self._answers.move_to_end((device, transfer_id))
        while len(self._answers) > ANSWER_HISTORY:
            self._answers.popitem(last=False)
        if answer[0] == "accepted":
            self._rounds_sent[device] = (answer[2], transfer_id)

    # -- answers -------------------------------------------------------------------------

    def offer(self, device: str, transfer_id: str, data: bytes | memoryview, round_: int | None = None) -> Outcome:
        """Judge one client-update blob received under ``device``'s update topic; an
        accepted one goes into the buffer at once with weight ``samples * w(staleness)``.
        ``round_``: the task round the transfer's manifest named, which a refusal of an
        envelope that cannot be read names."""
        outcome = self._judge(device, transfer_id, data)
        if isinstance(outcome, Repeat):
            return outcome
        wire = self.tally.judged(device, transfer_id, outcome.reason if isinstance(outcome, Rejected) else None)
        if isinstance(outcome, Accepted):
            upd = outcome.update
            stale = self.version - upd.base_version
            weight = upd.samples * self.staleness.weight(stale)
            self.aggregate.add(outcome.sparse, weight)
            self.checks.accepted(outcome.norm)
            self.buffer.append(Buffered(device, transfer_id, upd.round, upd.samples, stale, weight))
            self.samples += upd.samples
            self.discounted += weight
            metrics = dict(upd.metrics, staleness=float(stale), task_round=float(upd.round))
            self.tally.add_metrics(metrics, upd.samples)
            self.parts.append(ParticipationRecord(device, transfer_id, "accepted", "", upd.samples, wire, metrics))
            self._remember(device, transfer_id, ("accepted", "", upd.round))
            return outcome
        assert isinstance(outcome, Rejected)
        samples = outcome.update.samples if outcome.update is not None else 0
        named = outcome.round if outcome.round >= 0 else self._round_of(device, round_)
        self.parts.append(ParticipationRecord(device, transfer_id, "rejected", outcome.reason, samples, wire,
                                              {"task_round": float(named)}))
        self._remember(device, transfer_id, ("rejected", outcome.reason, named))
        return Rejected(outcome.reason, outcome.detail, outcome.update, named)

    def admit(self, device: str, transfer_id: str, size: int,
              round_: int | None = None) -> Repeat | Rejected | None:
        """Judge a transfer from its manifest, before anything is allocated for it (as
        :meth:`fedmq.fl.rounds.RoundEngine.admit`; every known device may send at any time):
        a resend of an answered transfer gets its :class:`Repeat` at once, a size above the
        bound or an unknown device is refused, anything else is assembled and offered.
        ``round_``: the task round the manifest names (None: it names none)."""
        previous = self._answers.get((device, transfer_id))
        if previous is not None:
            return Repeat(previous[0], previous[1], previous[2])
        if size > self.max_update_bytes:
            return Rejected("oversized", f"{size} bytes announced, limit {self.max_update_bytes}", None,
                            self._round_of(device, round_))
        if not self.is_known(device):
            return Rejected("unknown_device", f"no status ever seen from {device!r}", None,
                            self._round_of(device, round_))
        return None

    def _round_of(self, device: str, named: int | None = None) -> int:
        """The round a receipt names when the update's envelope could not be read: the one
        its manifest ``named``, else the round of the task the device holds, else the next step."""
        if named is not None:
            return named
        task_round = self.task_round_of(device)
        return task_round if task_round is not None else self.step + 1

    def refuse(self, device: str, transfer_id: str, reason: str, detail: str, round_: int | None = None, *,
               answered: bool | None = None) -> Rejected:
        """Record a transfer refused before its blob was assembled (``oversized`` from its
        manifest, ``malformed`` manifest, the service's ``busy`` and ``retained``), naming
        ``round_`` (the round its manifest names) when given. ``answered`` is
        :meth:`fedmq.fl.rounds.RoundEngine.refuse`'s; no round waits for an answer here."""
        wire = self.tally.judged(device, transfer_id, reason)
        named = self._round_of(device, round_)
        self.parts.append(ParticipationRecord(device, transfer_id, "rejected", reason, 0, wire,
                                              {"task_round": float(named)}))
        self._remember(device, transfer_id, ("rejected", reason, named))
        return Rejected(reason, detail, None, named)

    def _judge(self, topic_device: str, transfer_id: str, data: bytes | memoryview) -> Outcome:
        previous = self._answers.get((topic_device, transfer_id))
        if previous is not None:
            return Repeat(previous[0], previous[1], previous[2])
        upd = read_envelope(data, topic_device, federation=self.federation, spec=self.spec,
                            is_known=self.is_known, max_update_bytes=self.max_update_bytes)
        if isinstance(upd, Rejected):
            return upd

        def reject(reason: str, detail: str) -> Rejected:
            return Rejected(reason, detail, upd, upd.round)

        if self.max_steps is not None and self.step >= self.max_steps:
            return reject("finished", f"the last server step ({self.max_steps}) is done")
        if upd.base_version > self.version:
            return reject("wrong_base_version", f"trained from version {upd.base_version}, the global model is "
                                                f"at version {self.version}")
        sent = self._rounds_sent.get(upd.device)
        if sent is not None and sent[0] == upd.round:
            return reject("duplicate", f"{upd.device!r} already sent transfer {sent[1]} for task round {upd.round}")
        stale = self.version - upd.base_version
        if stale > self.staleness.max_staleness:
            return reject("stale", f"staleness {stale} (trained from version {upd.base_version}, global model at "
                                   f"{self.version}) above the maximum {self.staleness.max_staleness}")
        return self.checks.check(upd, self.spec, self.kind)

    # -- the server step -----------------------------------------------------------------

    def flush(self, closed: float) -> ClosedRound:
        """Empty the buffer into one server step at ``closed`` (seconds since the epoch).

        Returns:
            :class:`ClosedRound` whose ``model_delta`` is float32 ``(d,)``
            ``sum_i n_i w(s_i) u_i / sum_i n_i`` (in the update kind's sign convention, see
            :func:`fedmq.fl.aggregation.model_delta`) and whose record has ``round`` = the
            new step, ``base_version`` -> ``model_version`` = ``version + 1``.

        Raises:
            ValueError: the buffer is empty.
        """
        if not self.buffer:
            raise ValueError("flush of an empty buffer")
        mean = self.aggregate.result()
        delta = model_delta(mean, self.kind) * np.float32(self.discounted / self.samples)
        self.step += 1
        tally = self.tally
        metrics = {k: tally.metric_sums[k] / self.samples for k in sorted(tally.metric_sums)}
        record = RoundRecord(
            round=self.step, state="closed", base_version=self.version, model_version=self.version + 1,
            target=self.buffer_size, participants=len(self.buffer), accepted=len(self.buffer),
            rejected=dict(sorted(self.rejected.items())), test_loss=None, test_accuracy=None,
            device_metrics=metrics, bytes_up=tally.bytes_up, bytes_down=0,
            dense_bytes_up=4 * self.spec.size * tally.received, started=self.started, closed=closed,
            wall_s=closed - self.started,
            participations=sorted(self.parts, key=lambda p: (p.device, p.transfer_id)))
        self.version += 1
        self._start_buffer(closed)
        return ClosedRound(record, delta.astype(np.float32))
