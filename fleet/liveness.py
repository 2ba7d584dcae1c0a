"""Liveness of client-update settlement: random schedules on the in-memory bus, virtual clock.

Every client update a device sends must settle (the device commits it, or rolls it back into
its residual, on the coordinator's receipt naming the update's round and transfer), within a
round of the last time it was sent, and no round may wait until its deadline for a device
whose update for it has already settled. :func:`run_schedule` plays one seeded schedule and
checks both, with the safety invariants of the fault suite beside them (nothing accepted
twice; device and coordinator agree on every settled update) and the protocol's rule that a
receipt names the round of the update it answers.

What runs: the coordinator's own message handling (``Coordinator._handle``: statuses,
manifest admission within the service's limits, blob assembly, receipts), its round engine
and its state database, over a :class:`fedmq.transport.memory.MemoryBus`, with real manifests
(``BlobSender``), envelopes and codec payloads. The round loop (selection
with the real sampler, open, close at completion or deadline, restart) is driven here on a
virtual clock of ticks, so a schedule is exact and fast. Devices are a model of
:class:`edge_client.agent.EdgeAgent`'s settlement rules (docs/edge-client.md, steps 3-4): one
update in flight, sent again after ``receipt_timeout`` ticks, at once after a restart and
when a later round's task or a rerun arrives; a later task waits until the update in flight
settles; a rerun of a round whose update was accepted sends that update again.

Faults a schedule draws (seeded): slow uplinks (a device's update held back up to two round
lengths, so it arrives after the next round opened), duplicate sends, garbage manifests on a
selected device's update topic before or after its genuine update, over-selection, failed
rounds (``min_updates`` above what arrives), coordinator restarts (the round in flight is
lost and rerun, the database answers resends) and device restarts (reconnect, the retained
task again, the update in flight sent again).
"""

from __future__ import annotations

import logging
import queue
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from coordinator.config import config_from_dict
from coordinator.service import Coordinator
from fedmq.wire import topics
from fedmq.codecs import CodecSpec, encode
from fedmq.wire.envelope import ClientUpdate, encode_update
from fedmq.fl.rounds import RoundEngine, RoundRecord
from fedmq.fl.sampling import select_devices
from fedmq.wire.messages import Receipt, Status, RoundTask, TrainPlan
from fedmq.transport import Message
from fedmq.transport.memory import MemoryBus
from fedmq.transport.sender import BlobSender

TASK = "digits-logreg"
FED = "live"
#: Ticks from a round's opening to its deadline.
DEADLINE_TICKS = 8
#: Ticks without a receipt before a device sends its update in flight again.
RECEIPT_TIMEOUT_TICKS = 5
#: Rounds after the one in progress when an update last left its device within which it must
#: settle: the coordinator answers every send at once (from the manifest, the envelope or
#: the database), a round closes and the next opens at most once per tick, and a device reads
#: its receipts at its next tick. An answer lost on the way (a restart) is asked for again.
SETTLE_BOUND = 1
#: Most ticks of the drain after the last round (no round open) for what is still in flight
#: or still to be trained to be sent and answered: a held-back uplink, then a receipt timeout.
DRAIN_TICKS = 2 * DEADLINE_TICKS + 4 * RECEIPT_TIMEOUT_TICKS
#: Fault-free rounds played after a schedule's rounds, so that what is in flight can settle.
DRAIN_ROUNDS = 3


@dataclass(frozen=True)
class Schedule:
    """One random schedule, entirely derived from ``seed`` (:meth:`draw`)."""

    seed: int
    devices: int
    per_round: int
    over_selection: float
    min_updates: int
    rounds: int
    slow: float            # chance a device's update is held back (arrives late)
    duplicate: float       # per tick, chance a device sends its update in flight again
    garbage: float         # per selected device and round, chance of a garbage manifest
    coordinator_restart: float  # per tick
    device_restart: float  # per device and tick

    @classmethod
    def draw(cls, seed: int) -> Schedule:
        rng = np.random.default_rng([27, seed])
        devices = int(rng.integers(3, 8))
        return cls(seed=seed, devices=devices, per_round=int(rng.integers(1, devices + 1)),
                   over_selection=float(rng.choice([1.0, 1.3, 1.6])), min_updates=int(rng.integers(1, 3)),
                   rounds=int(rng.integers(4, 10)), slow=float(rng.choice([0.0, 0.2, 0.5])),
                   duplicate=float(rng.choice([0.0, 0.05, 0.2])), garbage=float(rng.choice([0.0, 0.2, 0.5])),
                   coordinator_restart=float(rng.choice([0.0, 0.01, 0.04])),
                   device_restart=float(rng.choice([0.0, 0.01, 0.04])))


@dataclass
class SentUpdate:
    """One client update as its device saw it."""

    device: str
    round: int
    transfer: str
    published_in: int | None = None  # the round in progress when it first left the device
    last_sent_in: int | None = None  # the round in progress when it last left the device
    settled_in: int | None = None    # the round in progress when it settled
    status: str = ""               # the receipt it settled on: accepted | rejected
    reason: str = ""


@dataclass
class ScheduleResult:
    """What one schedule did and which invariants it broke (``violations`` empty: none)."""

    schedule: Schedule
    rounds_played: int = 0
    updates: int = 0
    settled: int = 0
    max_rounds_to_settle: int = 0  # from the round during which it was first sent
    deadline_rounds: int = 0      # rounds closed by their deadline (not complete)
    failed_rounds: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)


class _Device:
    """A device following the agent's settlement rules (see the module docstring)."""

    def __init__(self, sim: _Simulation, name: str) -> None:
        self.sim, self.name = sim, name
        self.inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self.inflight: SentUpdate | None = None
        self.inflight_deadline = 0.0
        self.data = b""
        self.pending: RoundTask | None = None
        self.ready_at = 0
        self.hold_until = 0
        self.last_send = 0
        self.last_round, self.last_deadline = 0, 0.0
        self.kept: tuple[SentUpdate, bytes] | None = None  # last accepted update, for a rerun
        self.connect()

    def connect(self) -> None:
        self.link = self.sim.bus.link(self.name)
        self.link.connect()
        self.sender = BlobSender(self.link, keep=0)
        self.link.subscribe([topics.task(FED, self.name), topics.receipt(FED, self.name)], inbox=self.inbox)
        self.link.publish(topics.status(FED, self.name),
                          Status(self.name, True, TASK, self.sim.spec_hash, 10).to_bytes(), retain=True)

    def restart(self) -> None:
        """A new run from the same durable state: reconnect (the retained task comes again)
        and send the update in flight again at once."""
        self.link.drop()
        self.inbox = queue.SimpleQueue()
        self.pending = None
        self.connect()
        if self.inflight is not None:
            self.send()

    def send(self) -> None:
        assert self.inflight is not None
        self.last_send = self.sim.tick
        if self.sim.tick < self.hold_until:
            return  # the slow uplink: it goes out when the hold ends
        if self.inflight.published_in is None:
            self.inflight.published_in = self.sim.engine.round
        self.inflight.last_sent_in = self.sim.engine.round
        self.sender.send(topics.update_base(FED, self.name, self.inflight.transfer), self.data,
                         round_=self.inflight.round)

    def step(self) -> None:
        while True:
            try:
                msg = self.inbox.get_nowait()
            except queue.Empty:
                break
            if msg.topic == topics.receipt(FED, self.name):
                self.on_receipt(Receipt.from_bytes(msg.payload))
            elif msg.payload:
                self.on_task(RoundTask.from_bytes(msg.payload))
        sim = self.sim
        if self.inflight is not None:
            if sim.tick == self.hold_until or sim.tick - self.last_send >= RECEIPT_TIMEOUT_TICKS:
                self.send()
            elif sim.rng.random() < sim.schedule.duplicate:
                sim.result.faults["duplicate"] += 1
                self.send()
        elif self.pending is not None and sim.tick >= self.ready_at:
            self.train(self.pending)

    def on_task(self, task: RoundTask) -> None:
        inflight = self.inflight
        if inflight is not None:
            if task.round < inflight.round:
                return
            if task.round == inflight.round and task.deadline <= self.inflight_deadline:
                self.send()
                return
            if task.round == inflight.round:
                self.inflight_deadline = task.deadline  # a rerun of our round
            else:
                self.keep_pending(task)
            self.send()
            return
        if self.kept is not None and task.round == self.kept[0].round and task.deadline > self.last_deadline:
            # A rerun of a round whose update was accepted: the same update again.
            self.inflight, self.data = self.kept
            self.inflight_deadline = self.last_deadline = task.deadline
            self.inflight.settled_in = None
            self.send()
            return
        if task.round > self.last_round or (task.round == self.last_round and task.deadline > self.last_deadline):
            self.keep_pending(task)

    def keep_pending(self, task: RoundTask) -> None:
        if self.pending is None or (task.round, task.deadline) >= (self.pending.round, self.pending.deadline):
            self.pending = task
            self.ready_at = self.sim.tick + int(self.sim.rng.integers(1, 3))

    def train(self, task: RoundTask) -> None:
        sim = self.sim
        self.pending = None
        vector = (0.01 * sim.rng.standard_normal(sim.spec_size)).astype(np.float32)
        payload = encode(vector, sim.coordinator.spec, CodecSpec.of())
        self.data = encode_update(ClientUpdate(federation=FED, device=self.name, round=task.round,
                                               base_version=task.model_version, samples=10, kind="delta",
                                               spec_hash=sim.spec_hash, codec="topk-int8", payload=payload))
        transfer = f"r{task.round}-{sim.rng.integers(1 << 32):08x}"
        self.inflight = SentUpdate(self.name, task.round, transfer)
        self.inflight_deadline = task.deadline
        self.last_round, self.last_deadline = task.round, task.deadline
        sim.sent.append(self.inflight)
        if sim.faulty and sim.rng.random() < sim.schedule.slow:
            sim.result.faults["slow"] += 1
            self.hold_until = sim.tick + int(sim.rng.integers(DEADLINE_TICKS // 2, 2 * DEADLINE_TICKS + 1))
        self.send()

    def on_receipt(self, receipt: Receipt) -> None:
        inflight = self.inflight
        if inflight is None or receipt.transfer_id != inflight.transfer:
            return  # as the agent: it does not match the update in flight
        if receipt.round != inflight.round:
            # The agent settles on it all the same (the transfer names the update), but the
            # protocol says every receipt names the round of the update it answers.
            self.sim.result.violations.append(
                f"receipt for {self.name}'s update {inflight.transfer} of round {inflight.round} names round "
                f"{receipt.round}")
        inflight.settled_in, inflight.status, inflight.reason = self.sim.engine.round, receipt.status, receipt.reason
        self.kept = (inflight, self.data) if receipt.status == "accepted" else None
        self.inflight = None
        self.hold_until = 0


class _Simulation:
    def __init__(self, schedule: Schedule, folder: Path) -> None:
        self.schedule = schedule
        self.rng = np.random.default_rng([28, schedule.seed])
        self.folder = folder
        self.bus = MemoryBus(f"liveness-{schedule.seed}")
        self.result = ScheduleResult(schedule)
        self.tick = 0
        self.rounds_opened = 0
        self.faulty = True
        self.sent: list[SentUpdate] = []
        self.records: list[RoundRecord] = []
        self.round_done, self.version = 0, 0
        self.rounds_opened = 0
        self.config = config_from_dict({
            "federation": FED, "task": TASK, "rounds": 10**6, "seed": schedule.seed,
            "state_dir": str(folder / "coordinator"), "broker": {"url": f"memory://{self.bus.name}"},
            "round": {"devices_per_round": schedule.per_round, "over_selection": schedule.over_selection,
                      "min_updates": min(schedule.min_updates, schedule.per_round), "min_devices": 1,
                      "deadline_s": float(DEADLINE_TICKS)},
            "evaluation": {"data": "none"}, "publish": {"onnx": False}})
        self.boot()
        self.spec_hash = self.coordinator.spec.hash
        self.spec_size = self.coordinator.spec.size
        self.devices = [_Device(self, f"d{i}") for i in range(schedule.devices)]
        self.attacker = self.bus.link("attacker").connect()
        self.pump()

    def boot(self) -> None:
        """A coordinator process: its link, receiver, database and engine, resumed from the
        last finished round (the database answers resends of earlier rounds)."""
        coord = self.coordinator = Coordinator(self.config, link=self.bus.link("coordinator"))
        self.db = coord.db
        coord.link.connect()
        coord.receiver.timeout = 3600.0
        coord.link.subscribe([topics.status_filter(FED), topics.update_filter(FED)], inbox=coord.inbox.queue)
        # The simulator's own engine in place of the policy's: resumed where the schedule stands,
        # with the engine's default checks (the schedule checks settlement, not content).
        self.engine = coord.policy.engine = RoundEngine(
            FED, coord.spec, kind="delta", is_known=lambda d: d in coord.registry.devices,
            max_update_bytes=coord.update_limit, min_updates=self.config.round.min_updates,
            round=self.round_done, base_version=self.version, lookup=self.db.transfer_outcome)
        self.pump()

    def pump(self) -> None:
        coord = self.coordinator
        while True:
            try:
                msg = coord.inbox.queue.get_nowait()
            except queue.Empty:
                return
            coord.inbox.handle(msg, notify=False)

    def restart_coordinator(self) -> None:
        """kill -9: the round in flight is lost (nothing of it was written) and rerun."""
        self.result.faults["coordinator_restart"] += 1
        self.coordinator.link.drop()
        self.db.close()
        self.boot()

    def open_round(self) -> None:
        coord, engine = self.coordinator, self.engine
        r = self.round_done + 1
        eligible = coord.registry.eligible(TASK, self.spec_hash)
        policy = self.config.round.participation()
        selected = select_devices(eligible, policy, self.schedule.seed, r)
        target = min(policy.target(len(eligible)), len(selected))
        deadline = self.tick + DEADLINE_TICKS
        engine.open(r, self.version, selected, target, float(deadline), float(self.tick))
        self.rounds_opened += 1
        self.deadline = deadline
        for device in selected:
            task = RoundTask(FED, device, r, self.version, self.spec_hash, float(deadline), TrainPlan())
            coord.link.publish(topics.task(FED, device), task.to_bytes(), retain=True)
        self.garbage_at: dict[int, list[str]] = {}
        if self.faulty:
            for device in selected:
                if self.rng.random() < self.schedule.garbage:
                    at = self.tick + int(self.rng.integers(0, DEADLINE_TICKS))
                    self.garbage_at.setdefault(at, []).append(device)

    def close_round(self) -> None:
        engine = self.engine
        complete = engine.complete
        unanswered = [d for d in engine.selection if d not in engine.answered]
        rec = engine.close(float(self.tick)).record
        self.db.write_round(rec)
        self.records.append(rec)
        for device in engine.selection:
            self.coordinator.link.publish(topics.task(FED, device), b"", retain=True)
        self.round_done = rec.round
        self.version = rec.model_version
        self.result.rounds_played += 1
        self.result.failed_rounds += rec.state == "failed"
        if not complete:
            self.result.deadline_rounds += 1
            by_name = {d.name: d for d in self.devices}
            for name in unanswered:
                dev = by_name[name]
                if dev.inflight is None and dev.pending is None and dev.last_round >= rec.round:
                    self.result.violations.append(
                        f"round {rec.round} waited until its deadline for {name}, whose update for round "
                        f"{dev.last_round} had already settled")

    def run(self) -> ScheduleResult:
        sched = self.schedule
        total = sched.rounds + DRAIN_ROUNDS
        self.open_round()
        while self.round_done < total:
            self.faulty = self.round_done < sched.rounds
            self.tick += 1
            for name in self.garbage_at.pop(self.tick, []):
                self.result.faults["garbage"] += 1
                self.attacker.publish(topics.blob_manifest(topics.update_base(FED, name, f"g{self.tick}")),
                                      b"\x93garbage")
            for dev in self.devices:
                if self.faulty and self.rng.random() < sched.device_restart:
                    self.result.faults["device_restart"] += 1
                    dev.restart()
                dev.step()
            self.pump()
            if self.faulty and self.rng.random() < sched.coordinator_restart:
                self.restart_coordinator()
                self.open_round()
                continue
            if self.engine.complete or self.tick >= self.deadline:
                self.close_round()
                if self.round_done < total:
                    self.open_round()
        # No round open: what is still in flight or to be trained is sent and answered.
        for _ in range(DRAIN_TICKS):
            if all(d.inflight is None and d.pending is None for d in self.devices):
                break
            self.tick += 1
            for dev in self.devices:
                dev.step()
            self.pump()
        self.check()
        self.db.close()
        return self.result

    def check(self) -> None:
        res = self.result
        res.updates = len(self.sent)
        accepted: Counter[tuple[str, str]] = Counter()
        aggregated: set[tuple[str, str]] = set()
        for rec in self.records:
            for p in rec.participations:
                if p.status == "accepted":
                    accepted[(p.device, p.transfer_id)] += 1
                    if rec.state == "closed":
                        aggregated.add((p.device, p.transfer_id))
        for key, n in accepted.items():
            if n > 1:
                res.violations.append(f"transfer {key} accepted in {n} rounds")
        for u in self.sent:
            key = (u.device, u.transfer)
            if u.settled_in is None:
                res.violations.append(f"{u.device}'s update for round {u.round} ({u.transfer}) never settled")
                continue
            res.settled += 1
            assert u.published_in is not None and u.last_sent_in is not None
            res.max_rounds_to_settle = max(res.max_rounds_to_settle, u.settled_in - u.published_in)
            if u.settled_in - u.last_sent_in > SETTLE_BOUND:
                res.violations.append(f"{u.device}'s update for round {u.round}, last sent during round "
                                      f"{u.last_sent_in}, settled during round {u.settled_in}")
            if u.status == "rejected" and key in aggregated:
                res.violations.append(f"{u.device} rolled back {u.transfer}, which a closed round aggregated")
            if u.status == "accepted" and key not in accepted:
                res.violations.append(f"{u.device} committed {u.transfer}, which no round accepted")


def run_schedule(seed: int) -> ScheduleResult:
    """Play the schedule of ``seed`` (:meth:`Schedule.draw`) and check its invariants.

    Returns:
        :class:`ScheduleResult`; ``violations`` lists every broken invariant (empty: none).
    """
    folder = Path(tempfile.mkdtemp(prefix=f"fedmq-liveness-{seed}-"))
    level = logging.getLogger("fedmq").level
    logging.getLogger("fedmq").setLevel(logging.WARNING)  # every refusal logs a line at INFO
    try:
        return _Simulation(Schedule.draw(seed), folder).run()
    finally:
        logging.getLogger("fedmq").setLevel(level)
        shutil.rmtree(folder, ignore_errors=True)


def run_schedules(seeds: range) -> dict[str, object]:
    """Play every schedule of ``seeds``; the summary the fault suite reports."""
    results = [run_schedule(s) for s in seeds]
    faults: Counter[str] = Counter()
    for r in results:
        faults.update(r.faults)
    return {"schedules": len(results), "rounds": sum(r.rounds_played for r in results),
            "updates": sum(r.updates for r in results), "settled": sum(r.settled for r in results),
            "max_rounds_to_settle": max((r.max_rounds_to_settle for r in results), default=0),
            "deadline_rounds": sum(r.deadline_rounds for r in results),
            "failed_rounds": sum(r.failed_rounds for r in results), "faults": dict(sorted(faults.items())),
            "violations": [f"seed {r.schedule.seed}: {v}" for r in results for v in r.violations]}

