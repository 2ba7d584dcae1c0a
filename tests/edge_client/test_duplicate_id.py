"""Two edge agents configured with one device id, over a real mosquitto (MQTT 5): each
says in its log that another agent uses its id, one backs off instead of fighting, and the
coordinator flags the device in `fedmq coordinator status`."""

from __future__ import annotations

import logging
import random
import threading
import time
from pathlib import Path

from coordinator.config import config_from_dict
from coordinator.presence import DeviceRegistry
from coordinator.service import Coordinator
from coordinator.status import build_status, render_text
from edge_client.agent import EdgeAgent
from edge_client.config import load_config
from edge_client.duplicate import TakeoverWatch
from fedmq.data import digits_split, save_npz_atomic
from fedmq.wire.messages import Status
from tests.waiting import until

WAIT = 60.0


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def errors_of(self, thread: str) -> list[str]:
        return [r.getMessage() for r in self.records if r.threadName == thread and r.levelno >= logging.ERROR]


def _until(condition, timeout: float = WAIT, what: str = "condition"):
    value = until(condition, timeout)
    assert value, f"timed out waiting for {what}"
    return value


def _agent(tmp_path: Path, name: str, url: str, seed: int) -> EdgeAgent:
    folder = tmp_path / name
    folder.mkdir()
    x, y, _, _ = digits_split()
    save_npz_atomic(folder / "data.npz", x[:100], y[:100])
    (folder / "edge.toml").write_text('device_id = "pi-07"\nfederation = "lab"\ntask = "digits-logreg"\n'
                                      f'data = "data.npz"\nstate_dir = "state"\n[broker]\nurl = "{url}"\n')
    # A short first back-off keeps the test brief; the production default is 30 s.
    return EdgeAgent(load_config(folder / "edge.toml", environ={}), environ={},
                     takeovers=TakeoverWatch(first_backoff_s=20.0, rng=random.Random(seed)))


def test_two_agents_with_one_device_id_are_reported_on_both_sides(tmp_path: Path, mosquitto) -> None:
    handler = _Records()
    for name in ("edge_client.agent", "fedmq.coordinator"):
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(logging.INFO)
    # A coordinator that waits for 5 devices (it never opens a round here) and watches presence.
    cfg = config_from_dict({"federation": "lab", "task": "digits-logreg", "rounds": 1,
                            "state_dir": str(tmp_path / "coordinator"),
                            "broker": {"url": mosquitto.url, "protocol": "5"},
                            "round": {"devices_per_round": 5, "min_devices": 5, "wait_for_devices_s": 3600},
                            "publish": {"onnx": False}})
    coord = Coordinator(cfg)
    coord_thread = threading.Thread(target=coord.run, name="coordinator", daemon=True)
    coord_thread.start()
    stop = threading.Event()
    agents = {name: _agent(tmp_path, name, mosquitto.url, seed) for seed, name in enumerate(("edge-a", "edge-b"))}
    threads = [threading.Thread(target=a.run, args=(stop,), name=name, daemon=True) for name, a in agents.items()]
    try:
        threads[0].start()
        _until(lambda: agents["edge-a"].link.connected, what="the first agent online")
        threads[1].start()
        # Each agent names the cause in its own log.
        for name in agents:
            _until(lambda: any("another agent is configured with device id 'pi-07'" in m
                               for m in handler.errors_of(name)), what=f"{name}'s error")
        # They stop fighting: one (or both, each for its own jittered time) backs off.
        backing = _until(lambda: [n for n, a in agents.items() if a.takeovers.backoffs], what="a back-off")
        assert all(any("backing off" in m for m in handler.errors_of(n)) for n in backing)
        # The back-off is counted just before the link closes: wait for the close itself.
        _until(lambda: all(not agents[n].link.connected for n in backing), what="the backing-off agents offline")
        # The coordinator saw two instances take turns and recorded it.
        doc = _until(lambda: (d := build_status(cfg.state_dir, time.time(), "lab", "digits-logreg"))["duplicate_ids"]
                     and d, what="the duplicate in the coordinator's state")
        assert doc["duplicate_ids"][0]["device"] == "pi-07"
        assert doc["duplicate_ids"][0]["instances"] == sorted(a.instance for a in agents.values())
        text = render_text(doc, time.time())
        assert "DUPLICATE DEVICE ID pi-07: 2 agents take turns on it" in text
        assert any("2 agents are using this device id" in r.getMessage() for r in handler.records
                   if r.name == "fedmq.coordinator")
    finally:
        stop.set()
        coord.stop()
        for t in threads + [coord_thread]:
            t.join(timeout=30)
        for name in ("edge_client.agent", "fedmq.coordinator"):
            logging.getLogger(name).removeHandler(handler)
    assert not any(t.is_alive() for t in threads + [coord_thread])


def test_a_restarted_device_is_not_a_duplicate() -> None:
    registry = DeviceRegistry()
    old, new = "aaaa", "bbbb"
    for t, (instance, online) in enumerate([(old, True), (old, False), (new, True), (new, False), (new, True)]):
        registry.on_status("pi-07", Status("pi-07", online, instance=instance), now=1000.0 + t)
    assert registry.conflicts == {}
    # Two agents: the first instance comes back after the second replaced it.
    registry.on_status("pi-07", Status("pi-07", True, instance=old), now=1010.0)
    conflict = registry.conflicts["pi-07"]
    assert conflict.instances == [old, new] and conflict.turns == 1
    assert [c.device for c in registry.conflict_reports(now=1010.0)] == ["pi-07"]
    assert registry.conflict_reports(now=1011.0) == []  # reported at most every 30 s


def test_takeover_watch_reports_the_second_drop_and_backs_off_at_the_third() -> None:
    watch = TakeoverWatch(window_s=120.0, first_backoff_s=30.0, max_backoff_s=100.0, rng=random.Random(1))
    assert watch.observe(0, 0.0) is None
    assert watch.observe(1, 10.0) is None      # one drop alone: a one-off
    assert watch.observe(1, 11.0) is None
    assert watch.observe(2, 200.0) is None     # the earlier one is out of the window
    assert watch.observe(3, 201.0) == "report"
    assert watch.observe(4, 202.0) == "back_off"
    pauses = [watch.backoff_s() for _ in range(3)]
    assert 22.5 <= pauses[0] <= 37.5 and 45.0 <= pauses[1] <= 75.0 and 75.0 <= pauses[2] <= 125.0
