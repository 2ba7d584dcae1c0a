"""Every client update settles, through mosquitto: the real coordinator and real edge agents
(threads), issue 27's scenario. A malformed manifest on a selected device's update topic as
round 1 opens counts as that device's answer; its genuine update reaches the coordinator only
after round 2, which did not select it, opened, and is refused ``late`` from its manifest. The
receipt names round 1 (the update's own round), so the agent rolls the update back, and the
later rounds that select the device get its updates: none waits until its deadline."""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Any

import pytest

from coordinator.service import Coordinator, Progress
from edge_client.agent import EdgeAgent, broker_settings
from fedmq.wire import topics
from fedmq.fl.sampling import SelectionPolicy, select_devices
from fedmq.transport import Link, Message, open_link
from tests.coordinator.downlink_fleet import coordinator_config, device_threads
from tests.waiting import until

pytestmark = pytest.mark.timeout(180)

FED = "settle"
DEVICES = 4
PER_ROUND = 2
ROUNDS = 6
#: The federation seed of ``coordinator_config``: the selection of every round follows from it.
SEED = 3


class HeldUplink:
    """The victim's link: its client-update publishes wait until ``release`` is set (a slow
    uplink), everything else passes. Every other attribute is the link's."""

    def __init__(self, link: Link, device: str) -> None:
        self._link = link
        self._prefix = topics.update_base(FED, device, "")
        self.release = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._link, name)

    @property
    def inbox(self) -> queue.SimpleQueue[Message]:
        return self._link.inbox

    @inbox.setter
    def inbox(self, inbox: queue.SimpleQueue[Message]) -> None:
        self._link.inbox = inbox

    def _hold(self, topic: str) -> None:
        if topic.startswith(self._prefix):
            assert self.release.wait(120), "the test never released the held client update"

    def publish(self, topic: str, payload: bytes, **kwargs: Any):  # noqa: ANN201 - the link's handle
        self._hold(topic)
        return self._link.publish(topic, payload, **kwargs)

    def publish_wait(self, topic: str, payload: bytes, **kwargs: Any) -> None:
        self._hold(topic)
        self._link.publish_wait(topic, payload, **kwargs)


def _victim(devices: list[str], rounds: int) -> str:
    """A device selected in round 1, not in round 2 (so its late update is refused at
    admission, before its envelope is read), and selected again in a later round."""
    policy = SelectionPolicy(PER_ROUND, 1.0)
    chosen = {r: set(select_devices(devices, policy, SEED, r)) for r in range(1, rounds + 1)}
    return next(d for d in sorted(chosen[1] - chosen[2]) if any(d in chosen[r] for r in range(3, rounds + 1)))


def test_a_late_update_after_a_garbage_manifest_settles_and_no_round_waits_for_it(mosquitto, tmp_path: Path):
    fleet = device_threads(tmp_path, mosquitto.url, mosquitto.protocol, FED, DEVICES)
    cfg = coordinator_config(mosquitto.url, mosquitto.protocol, tmp_path / "state", FED, rounds=ROUNDS,
                             per_round=PER_ROUND, min_devices=DEVICES)
    assert cfg.seed == SEED
    victim_id = _victim([f"dev{i}" for i in range(DEVICES)], ROUNDS)
    victim_cfg = fleet.config(int(victim_id[3:]))
    held = HeldUplink(open_link(broker_settings(victim_cfg), client_id=victim_id), victim_id)
    victim = EdgeAgent(victim_cfg, link=held)
    stop = threading.Event()
    victim_thread = threading.Thread(target=victim.run, args=(stop,), daemon=True, name=victim_id)
    victim_thread.start()
    for i in range(DEVICES):
        if f"dev{i}" != victim_id:
            fleet.start(i)
    attacker = open_link(broker_settings(fleet.config(0)), client_id="attacker").connect()

    def on(p: Progress) -> None:
        if p.kind == "round_open" and p.round == 1:
            # Garbage where the victim's manifest goes, before its genuine update.
            attacker.publish(topics.blob_manifest(topics.update_base(FED, victim_id, "forged")), b"\x93garbage")
        elif p.kind == "round_open" and p.round == 2:
            held.release.set()

    coord = Coordinator(cfg)
    try:
        result = coord.run(on)
        # The last round's receipts left with the run's end; the victim settles on its own
        # time (stopping it at once raced the receipt of its last update).
        until(lambda: victim.state.record.inflight is None, 30.0)
    finally:
        held.release.set()
        stop.set()
        victim_thread.join(30)
        victim._state_lock.close()
        fleet.stop_all()
        attacker.close()
    assert not victim_thread.is_alive()
    assert [rec.round for rec in result.records] == list(range(1, ROUNDS + 1))
    first = {(p.device, p.transfer_id): p for p in result.records[0].participations}
    assert first[(victim_id, "forged")].reason == "malformed"
    assert result.records[0].accepted == PER_ROUND - 1
    # The genuine round-1 update arrived in round 2, which did not select the victim: refused
    # late at admission, its receipt naming round 1, and the agent settled on it.
    late = [p for p in result.records[1].participations if p.device == victim_id]
    assert [p.reason for p in late] == ["late"] and late[0].metrics["task_round"] == 1.0
    assert victim.counters["rejected"] == 1 and victim.counters["rolled_back"] == 1
    assert victim.state.record.inflight is None
    # Every later round: each selected device answered (none ran to its deadline waiting for
    # the victim), and the victim's updates were accepted where it was selected.
    for rec in result.records[1:]:
        assert rec.accepted == PER_ROUND, (rec.round, rec.rejected)
        assert all(p.status != "no_answer" for p in rec.participations), rec.participations
    assert any(p.device == victim_id and p.status == "accepted" for rec in result.records[2:]
               for p in rec.participations)
