"""The secure-aggregation policy of a round (SecAgg+ over MQTT), run by :mod:`coordinator.phases`.

The coordinator learns the sum of the survivors' inputs on the round's common support and
nothing else about any one of them (Bonawitz et al. 2017; Bell et al. 2020, SecAgg+; the
maths: :mod:`fedmq.secagg`). A round is one *attempt* (16 hex characters, fresh at each
start of the round: a coordinator that restarts reruns the round under a new attempt and the
devices make fresh keys for it), in five steps:

0. ``sa_setup`` to every selected device: the round's parameters;
1. phase ``keys``: each device's two public keys; then to each device of U1 its neighbours'
   keys (``sa_neighbours``);
2. phase ``shares``: each device's shares sealed to its neighbours; then to each device of
   U2 the ciphertexts addressed to it (``sa_relay``): the coordinator cannot open them;
3. phase ``input``: each device's masked input (training happens between setup and this
   phase, so it closes at the round's deadline); the unmasking request (survivors U3,
   dropped U2 \\ U3, disjoint) is written to ``state_dir/secagg-requests.json`` *before* it
   is sent, so that every request the coordinator ever made is on record;
4. phase ``reveal``: the survivors' shares, until every secret the unmasking needs has t of
   them (or every survivor answered, or the deadline); then the exact integer sum.

Each phase has the quorum t: with fewer answers the round fails (:class:`SecureOutcome`
state ``failed``), nothing is aggregated, and the ``sa_result`` the caller publishes after
its checkpoint tells every device to put its input back into its residual. A device refuses
an unmasking request that names one device both as survivor and as dropped, and a second,
different request within one attempt: the coordinator never obtains both kinds of share of
one device, not even across its own restarts (a restarted coordinator cannot reopen an
attempt).

Every refusal is counted with the reason ``secagg_<reason>`` through the phase driver.

:class:`SecurePhases` makes these phases a synchronous round's (:mod:`coordinator.synchronous`):
the ``secure`` round policy, registered at the end of this module.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from coordinator.config import SecureAggregationConfig
from coordinator.evaluation import gate_gradient
from coordinator.phases import Phase, PhaseFailed, PhaseIO, Refused, run_phase
from coordinator.policy import PolicyParts, RoundContext, register_policy
from coordinator.state import CHECKPOINT_NAME, load_checkpoint
from coordinator.synchronous import SyncRounds
from fedmq.wire import topics
from fedmq.storage.atomic import atomic_write_text
from fedmq.errors import FedmqError, StateError
from fedmq.fl.aggregation import model_delta
from fedmq.fl.rounds import ClosedRound, ParticipationRecord, RoundRecord
from fedmq.secagg import AdvertisedKeys, RingSpec, RoundParams, SecAggError, SecAggServer, common_support
from fedmq.secagg import messages as sm
from fedmq.secagg.messages import MAX_DEVICES
from fedmq.secagg.protocol import UnmaskResponse
from fedmq.secagg.shamir import PRIME
from fedmq.model.params import ParamSpec
from fedmq.privacy.discrete import noise_headroom
from fedmq.transport import Link, Message


log = logging.getLogger("fedmq.coordinator.secure")

#: The record of unmasking requests, in the coordinator's state folder.
REQUESTS_NAME = "secagg-requests.json"
#: Requests kept on record (the newest ones).
MAX_REQUESTS_KEPT = 256


@dataclass(frozen=True)
class SecureOutcome:
    """What a secure round gave.

    Attributes:
        round, attempt: the round and its attempt id.
        state: ``closed`` (``total`` is the exact sum of the survivors' inputs) or ``failed``.
        survivors: U3, the devices whose inputs are in ``total`` (empty when failed).
        support: the common support, sorted int64 ``(k,)``.
        total: the exact integer sum, int64 ``(k,)``; None when failed.
        scale: integers per update unit.
        reason: why the round failed ("" when closed).
        phase_s: seconds each phase took.
        masked: what the coordinator held of each survivor: its masked input, uint64 ``(k,)``.
        bytes_in: payload bytes each device sent in the attempt's accepted messages.
    """

    round: int
    attempt: str
    state: str
    survivors: tuple[str, ...]
    support: np.ndarray
    total: np.ndarray | None
    scale: float
    reason: str = ""
    phase_s: dict[str, float] = field(default_factory=dict)
    masked: dict[str, np.ndarray] = field(default_factory=dict)
    bytes_in: dict[str, int] = field(default_factory=dict)

    def mean_delta(self, size: int, denominator: float | None = None) -> np.ndarray | None:
        """The survivors' mean input as a model-sized pseudo-gradient, float32 ``(size,)``
        (zero off the support); None when the round failed. An unweighted mean: weighting by
        sample counts would tell the coordinator each device's count times its input.
        ``denominator``: a fixed divisor instead of the survivors' count (differential
        privacy's expected participants, so that one device moves the mean by at most C / m)."""
        if self.total is None or not self.survivors:
            return None
        out = np.zeros(size, dtype=np.float32)
        divisor = float(len(self.survivors)) if denominator is None else float(denominator)
        out[self.support] = (self.total.astype(np.float64) / self.scale / divisor).astype(np.float32)
        return out

    def result_message(self) -> sm.Result:
        return sm.Result(self.round, self.attempt, self.state, self.survivors)

    @property
    def told(self) -> tuple[str, ...]:
        """The devices the result goes to: every one that took part in the attempt (a device
        that sent nothing keeps the retained result of the last attempt it took part in: the
        one that settles an input it may have left unsettled)."""
        return tuple(sorted(set(self.bytes_in) | set(self.survivors)))


class SecureRound:
    """The coordinator's side of secure rounds over a :class:`fedmq.transport.Link`.

    Args:
        federation: the federation id.
        link: the coordinator's connected link (subscribed to ``topics.secagg_up_filter``).
        settings: ``[secure_aggregation]``.
        io: the coordinator's loop (:class:`coordinator.phases.PhaseIO`).
        state_dir: where the record of unmasking requests is kept.
        pause: the coordinator's test hook, called ``(point, round)`` with ``secagg_keys``,
            ``secagg_shares`` (that phase closed, its relay not sent), ``secagg_input`` (the
            unmasking request on record, not sent) and ``secagg_reveal`` (the sum computed).
    """

    def __init__(self, federation: str, link: Link, settings: SecureAggregationConfig, io: PhaseIO,
                 state_dir: Path, pause: Callable[[str, int], None] = lambda _p, _r: None) -> None:
        self.fed, self.link, self.settings, self.io, self.pause = federation, link, settings, io, pause
        self.requests_path = Path(state_dir) / REQUESTS_NAME
        self.requests = self._load_requests()

    def _load_requests(self) -> list[dict[str, object]]:
        if not self.requests_path.exists():
            return []
        try:
            data = json.loads(self.requests_path.read_text())
            if not isinstance(data, list):
                raise ValueError("not a list")
        except (ValueError, OSError) as exc:
            raise StateError(f"{self.requests_path}: unreadable record of unmasking requests ({exc})") from None
        return data

    def run(self, round_: int, devices: list[str], *, size: int, support: np.ndarray, seed: int,
            deadline: float, noise: tuple[float, float] | None = None) -> SecureOutcome:
        """Run one attempt of round ``round_`` with the selected ``devices``.

        Args:
            size: the flat model's length.
            support: the round's common support, sorted int64 ``(k,)`` (:func:`plan_support`).
            seed: the federation's seed (the graph); deadline: of the masked inputs,
                wall-clock seconds since the epoch.
            noise: under differential privacy ``(clip norm, noise std)``: every device clips
                its values to that L2 norm and adds discrete Gaussian noise of that standard
                deviation (integers) to its input (``sa_setup_dp``); None: no noise.

        Returns:
            The outcome (never raises for a round that fails: its ``state`` says so).
        """
        s = self.settings
        attempt = secrets.token_hex(8)
        k = int(support.size)
        chosen = tuple(sorted(devices))[:MAX_DEVICES]
        if len(chosen) < len(devices):
            log.warning("secure round %d: %d devices selected, the first %d by id take part (MAX_DEVICES)", round_,
                        len(devices), MAX_DEVICES)
        timings: dict[str, float] = {}
        bytes_in: Counter[str] = Counter()

        def failed(reason: str) -> SecureOutcome:
            log.warning("secure round %d (attempt %s) failed: %s", round_, attempt, reason)
            return SecureOutcome(round_, attempt, "failed", (), support, None, s.scale, reason, timings,
                                 bytes_in=dict(bytes_in))

        clip = s.clip if noise is None else noise[0]
        try:
            ring = RingSpec(clip, s.scale, max(2, len(chosen)), 0 if noise is None else noise_headroom(noise[1]))
            params = RoundParams(round_, chosen, ring, k, seed=seed, degree=s.degree, threshold=s.threshold)
        except SecAggError as exc:
            return failed(str(exc))
        server = SecAggServer(params)
        t = params.threshold
        setup = sm.Setup(round_, attempt, chosen, size, sm.Setup.bitmap(support, size), clip, s.scale, seed,
                         params.degree, t, deadline)
        if noise is not None:
            setup = sm.NoisySetup.of(setup, noise[1])
        for d in chosen:
            self._send(d, setup)
        log.info("secure round %d (attempt %s): %d devices, degree %d, threshold %d, k %d, ring %d bits", round_,
                 attempt, len(chosen), params.degree, t, k, ring.bits)

        def head(msg: sm.Keys | sm.Shares | sm.MaskedInput | sm.Reveal) -> None:
            if (msg.round, msg.attempt) != (round_, attempt):
                raise Refused("stale", f"message of round {msg.round} attempt {msg.attempt}, expected {round_} "
                                       f"{attempt}")

        def counted(accept: Callable[[str, bytes], None]) -> Callable[[str, bytes], None]:
            def run(device: str, payload: bytes) -> None:
                accept(device, payload)
                bytes_in[device] += len(payload)
            return run

        def on_keys(device: str, payload: bytes) -> None:
            msg = sm.Keys.from_bytes(payload)
            head(msg)
            server.add_keys(AdvertisedKeys(device, msg.c_public, msg.s_public))

        def on_shares(device: str, payload: bytes) -> None:
            msg = sm.Shares.from_bytes(payload)
            head(msg)
            self._protocol(server.add_shares, device, msg.sealed)

        def on_input(device: str, payload: bytes) -> None:
            msg = sm.MaskedInput.from_bytes(payload)
            head(msg)
            self._protocol(server.add_masked_input, device, msg.array())

        def on_reveal(device: str, payload: bytes) -> None:
            msg = sm.Reveal.from_bytes(payload)
            head(msg)
            shares = [{o: int.from_bytes(v, "big") for o, v in m.items()} for m in (msg.b_shares, msg.s_shares)]
            if not all(0 <= v < PRIME for m in shares for v in m.values()):
                raise Refused("bad_share", f"a share of {device} lies outside the field")
            self._protocol(server.add_unmask_response, UnmaskResponse(device, *shares))

        def phase(name: str, kind: str, expected: frozenset[str], end: float, accept: Callable[[str, bytes], None],
                  enough: Callable[[frozenset[str]], bool] | None = None) -> frozenset[str]:
            start = time.monotonic()
            try:
                return run_phase(Phase(name, kind, expected, t, end), self.io, counted(accept), enough)
            finally:
                timings[name] = time.monotonic() - start

        now = self.io.clock
        try:
            u1 = phase("keys", "keys", frozenset(chosen), min(deadline, now() + s.phase_s), on_keys)
            keys = server.close_keys()
            self.pause("secagg_keys", round_)
            for d in u1:
                self._send(d, sm.Neighbours(round_, attempt, {v: keys[v].c_public + keys[v].s_public
                                                              for v in params.neighbours(d) if v in keys}))
            u2 = phase("shares", "shares", u1, min(deadline, now() + s.phase_s), on_shares)
            server.close_shares()
            self.pause("secagg_shares", round_)
            for d in u2:
                self._send(d, sm.Relay(round_, attempt, server.shares_for(d)))
            phase("input", "input", u2, deadline, on_input)
            request = server.close_inputs()
            self._record(round_, attempt, request.survivors, request.dropped)
            self.pause("secagg_input", round_)
            unmask = sm.Unmask(round_, attempt, request.survivors, request.dropped)
            for d in request.survivors:
                self._send(d, unmask)
            phase("reveal", "reveal", frozenset(request.survivors), now() + s.phase_s, on_reveal,
                  lambda _answered: all(len(server.b_shares.get(u, {})) >= t for u in request.survivors)
                  and all(len(server.s_shares.get(v, {})) >= t for v in request.dropped))
            total = server.result()
            self.pause("secagg_reveal", round_)
        except (PhaseFailed, SecAggError) as exc:
            server.phase = "failed"
            return failed(str(exc))
        log.info("secure round %d (attempt %s): sum of %d inputs, %d dropped after sharing keys", round_, attempt,
                 len(request.survivors), len(request.dropped))
        return SecureOutcome(round_, attempt, "closed", request.survivors, support, total, s.scale, "", timings,
                             dict(server.masked), dict(bytes_in))

    def publish_result(self, outcome: SecureOutcome) -> None:
        """Tell the devices of the attempt (:attr:`SecureOutcome.told`) how it ended: retained on
        each one's secure-round topic. Call it after the round's checkpoint is durable (the
        coordinator's service publishes the same bytes through its retained-state repair)."""
        payload = outcome.result_message().to_bytes()
        for d in outcome.told:
            self.link.publish(topics.secagg_down(self.fed, d), payload, retain=True)

    def _send(self, device: str, msg: sm.Setup | sm.Neighbours | sm.Relay | sm.Unmask) -> None:
        self.link.publish(topics.secagg_down(self.fed, device), msg.to_bytes())

    def _record(self, round_: int, attempt: str, survivors: tuple[str, ...], dropped: tuple[str, ...]) -> None:
        """Put the request on record, durably, before it is sent."""
        self.requests = (self.requests + [{"round": round_, "attempt": attempt, "survivors": list(survivors),
                                           "dropped": list(dropped)}])[-MAX_REQUESTS_KEPT:]
        atomic_write_text(self.requests_path, json.dumps(self.requests))

    @staticmethod
    def _protocol(fn: Callable[..., None], *args: object) -> None:
        try:
            fn(*args)
        except SecAggError as exc:
            raise Refused("protocol", str(exc)) from None


def closed_round(closed: ClosedRound, outcome: SecureOutcome, *, kind: str, size: int,
                 min_updates: int, denominator: float | None = None) -> tuple[ClosedRound, SecureOutcome]:
    """The round's record and model change from a secure attempt (the engine saw no client
    update: ``closed`` is its empty close). Fewer survivors than ``min_updates`` fail the round
    as well (the outcome then says ``failed``, so every device rolls back). ``denominator``:
    the mean's fixed divisor under differential privacy (:meth:`SecureOutcome.mean_delta`)."""
    if outcome.state == "closed" and len(outcome.survivors) < min_updates:
        outcome = replace(outcome, state="failed", survivors=(), total=None,
                          reason=f"{len(outcome.survivors)} survivors, min_updates {min_updates}")
    rec = closed.record
    mean = outcome.mean_delta(size, denominator)
    survivors = set(outcome.survivors)

    def part(d: str) -> ParticipationRecord:
        # A device that took part in a failed attempt is recorded as refused by the failure.
        failed = outcome.state == "failed" and d in outcome.bytes_in
        status = "accepted" if d in survivors else "rejected" if failed else "no_answer"
        return ParticipationRecord(d, outcome.attempt, status, "secagg_failed" if failed else "",
                                   bytes_up=outcome.bytes_in.get(d, 0))

    parts = [part(d) for d in sorted({p.device for p in rec.participations})]
    rejected = dict(rec.rejected)
    if outcome.state == "failed":
        rejected["secagg_failed"] = rejected.get("secagg_failed", 0) + 1
    rec = replace(rec, state=outcome.state, model_version=rec.base_version + (outcome.state == "closed"),
                  accepted=len(survivors), rejected=rejected, bytes_up=sum(outcome.bytes_in.values()),
                  dense_bytes_up=4 * size * len(outcome.bytes_in), participations=parts)
    return ClosedRound(rec, None if mean is None else model_delta(mean, kind)), outcome


def support_size(size: int, density: float) -> int:
    """Values per input of a secure round over ``size`` coordinates: ``ceil(density * size)``,
    at least 1 (the count a client-chosen Top-K of that density keeps)."""
    return max(1, min(size, math.ceil(density * size)))


def plan_support(spec: ParamSpec, density: float, dense_below: int, *, last_change: np.ndarray | None, seed: int,
                 round_: int, explore: float) -> np.ndarray:
    """The common support of a round under the train plan's codec settings: every coordinate
    of the tensors the codec sends dense (fewer than ``dense_below`` elements, as
    :class:`fedmq.codecs.CodecSpec` does), plus :func:`fedmq.secagg.common_support` of
    ``density`` over the other tensors' coordinates. So a secure input holds as many values
    as a client-chosen Top-K update of the same plan. ``last_change``: float32 ``(spec.size,)``
    ranking signal, only its magnitude counts (the service passes the last global step, with
    ``ranking = "gradient"`` plus :func:`coordinator.evaluation.gate_gradient`), or None.

    Returns:
        sorted, distinct int64 indices into the flat model, ``(k,)``.
    """
    small = [np.arange(o, o + n, dtype=np.int64) for o, n in zip(spec.offsets, spec.sizes) if n < dense_below]
    large = [np.arange(o, o + n, dtype=np.int64) for o, n in zip(spec.offsets, spec.sizes) if n >= dense_below]
    dense = np.concatenate(small) if small else np.zeros(0, dtype=np.int64)
    if not large:
        return dense
    rest = np.concatenate(large)
    chosen = common_support(rest.size, support_size(rest.size, density), seed=seed, round_=round_, explore=explore,
                            last_change=None if last_change is None else last_change[rest])
    return np.sort(np.concatenate([dense, rest[chosen]]))


def support_ranking(gradient: np.ndarray | None, last_change: np.ndarray | None) -> np.ndarray | None:
    """What a secure round ranks its common support by: float32 ``(size,)``, or None (all drawn).

    Both signals, each scaled to unit norm, summed in magnitude: the gate-sample loss gradient
    reaches coordinates off the last support (the last change alone never leaves round 1's
    random draw: issue #26, the MNIST CNN), the last change is what the devices' own inputs
    did on the support (the gradient alone, on the coordinator's IID held-out data, lost
    14 pp on the digits MLP under Dirichlet(0.5); the sum lost 3). Either alone when the other
    is None."""
    if gradient is None or last_change is None:
        return last_change if gradient is None else gradient
    g = np.abs(gradient) / max(float(np.linalg.norm(gradient)), 1e-30)
    c = np.abs(last_change) / max(float(np.linalg.norm(last_change)), 1e-30)
    return (g + c).astype(np.float32)


#: Checkpoint array (``opt.<name>``) of the last global model step, the support's ranking.
LAST_CHANGE = "secagg.last_change"


class SecurePhases:
    """The phases of a secure round (:class:`SecureRound`) as a synchronous round's phases.

    Tasks go out with the ``secure_aggregation`` flag; a plain client update in a secure
    round (an agent that ignores the flag) is refused ``secure_round`` and answered, so its
    device rolls it back. The attempt's result is kept with the round's checkpoint and
    published (retained) once the checkpoint is durable; a restart tells it again.

    Args:
        parts: the coordinator's parts.
    """

    def __init__(self, parts: PolicyParts) -> None:
        self.parts = parts
        cfg = parts.config
        self.settings = cfg.secure_aggregation
        #: The last global model step (the common support is ranked by it), float32 ``(d,)``.
        self.last_change: np.ndarray | None = None
        #: The outcome of the round being closed, until its checkpoint is durable.
        self.outcome: SecureOutcome | None = None
        #: The global model before the round's step, float32 ``(d,)`` (to compute ``last_change``).
        self.before: np.ndarray | None = None

    def start(self, ctx: RoundContext) -> None:
        """Subscribe to the phases' messages; tell the result of the last round again (a
        restart after its checkpoint may have cut it short)."""
        cfg, fed = self.parts.config, self.parts.config.federation
        self.parts.link.subscribe(topics.secagg_up_filter(fed), inbox=ctx.inbox.queue)
        ckpt = load_checkpoint(cfg.state_dir)
        if ckpt is not None and LAST_CHANGE in ckpt.optimizer_state:
            last = ckpt.optimizer_state[LAST_CHANGE]
            if last.shape != (self.parts.spec.size,):
                raise StateError(f"{cfg.state_dir}/{CHECKPOINT_NAME}: {LAST_CHANGE} of shape {last.shape}, "
                                 f"expected ({self.parts.spec.size},)")
            self.last_change = last.copy()
        raw = ckpt.meta.get("secagg_result") if ckpt is not None else None
        if raw and ckpt is not None:
            try:
                result = sm.Result.from_bytes(bytes.fromhex(raw))
                told = [topics.check_id(d, "device") for d in json.loads(ckpt.meta.get("secagg_told", "[]"))]
            except (ValueError, FedmqError) as exc:
                raise StateError(f"{cfg.state_dir}/{CHECKPOINT_NAME}: bad secure-round result ({exc})") from None
            for device in told:
                ctx.publisher.publish_retained(topics.secagg_down(fed, device), result.to_bytes())

    def _other(self, ctx: RoundContext, rounds: SyncRounds, msg: Message) -> None:
        fed = self.parts.config.federation
        parsed = topics.parse_update_topic(fed, msg.topic)
        if parsed is not None and parsed[2] == "m" and msg.payload and not msg.retain \
                and parsed[0] in self.parts.registry.devices:
            device, transfer, _ = parsed
            ctx.inbox.answer(device, transfer, rounds.engine.refuse(device, transfer, "secure_round",
                                                                    "a plain client update in a secure round"))
            return
        if parsed is None or parsed[2] == "m" or msg.retain:
            ctx.inbox.handle(msg)
        else:
            ctx.inbox.rejections["secure_round_chunk"] += 1  # of a plain update refused by its manifest

    def run(self, ctx: RoundContext, rounds: SyncRounds, eligible: int) -> ClosedRound | None:
        """Run the round's secure attempt and close the round with it."""
        cfg, engine = self.parts.config, rounds.engine
        rounds.publish_tasks(ctx, engine.selection, secure=True)
        rounds.announce(ctx, eligible)
        fed, spec = cfg.federation, self.parts.spec
        io = ctx.phase_io(lambda msg: self._other(ctx, rounds, msg),
                          parse=lambda t: topics.parse_secagg_up(fed, t), gone=lambda d: d in rounds.gone)
        secure = SecureRound(fed, self.parts.link, self.settings, io, cfg.state_dir, self.parts.control.pause)
        plan = cfg.plan
        # With ranking "gradient", also by the loss gradient on the coordinator's held-out gate
        # samples: the last change lies only on the last support (issue #26, docs/security.md).
        ranking = gate_gradient(self.parts.task, ctx.stepper.model, spec, ctx.vector, ctx.stepper.eval_data,
                                cfg.evaluation.gate_samples) if self.settings.ranking == "gradient" else None
        codec = cfg.warmup.apply(plan.codec, engine.round)
        density = self.settings.density if self.settings.density is not None else codec.density
        support = plan_support(spec, density, getattr(codec.params, "dense_below", 0),
                               last_change=support_ranking(ranking, self.last_change), seed=cfg.seed,
                               round_=engine.round, explore=self.settings.explore)
        privacy = self.parts.privacy
        noise = None if privacy is None else (privacy.clip_norm, privacy.discrete_std())
        outcome = secure.run(engine.round, engine.selection, size=spec.size, support=support, seed=cfg.seed,
                             deadline=engine.deadline, noise=noise)
        if self.parts.control.stopping:
            return None
        closed, self.outcome = closed_round(engine.close(time.time()), outcome, kind=plan.update_kind,
                                            size=spec.size, min_updates=cfg.round.min_updates,
                                            denominator=None if privacy is None else privacy.denominator)
        log.info("round %d: secure attempt %s %s; phases %s", engine.round, outcome.attempt, outcome.state,
                 {name: round(s, 3) for name, s in outcome.phase_s.items()})
        self.before = ctx.vector.copy()
        return closed

    def checkpoint_arrays(self, vector: np.ndarray, stepped: bool) -> dict[str, np.ndarray]:
        """The last global model step (what the next support is ranked by), kept with the
        checkpoint so that a restarted coordinator ranks its next support as an uninterrupted
        one would (``opt.secagg.last_change``)."""
        if stepped and self.before is not None:
            self.last_change = vector - self.before
        return {} if self.last_change is None else {LAST_CHANGE: self.last_change}

    def checkpoint_meta(self) -> dict[str, str]:
        """The attempt's result, on record with the round: a restart after the checkpoint tells the devices again."""
        if self.outcome is None:
            return {}
        return {"secagg_result": self.outcome.result_message().to_bytes().hex(),
                "secagg_told": json.dumps(self.outcome.told)}

    def after_checkpoint(self, ctx: RoundContext, rec: RoundRecord, stepped: bool) -> None:
        outcome = self.outcome
        if outcome is not None:
            result = outcome.result_message().to_bytes()
            for device in outcome.told:
                ctx.publisher.publish_retained(topics.secagg_down(self.parts.config.federation, device), result)
        self.outcome, self.before = None, None


register_policy("secure", lambda parts: SyncRounds(parts, SecurePhases(parts)))
