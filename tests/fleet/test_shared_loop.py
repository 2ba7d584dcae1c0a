"""Many connections per network thread: ``network = "shared"`` (fleet/stepper.py,
fedmq/transport/netloop.py) runs the real edge agent, event-driven, through a real mosquitto."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.config import config_from_dict
from coordinator.service import Coordinator
from fedmq.errors import ConfigError
from fleet.fleet import Fleet, FleetSpec, Heterogeneity, load_fleet_spec


def test_shared_network_loop_runs_rounds_and_settles_every_update(mosquitto, tmp_path: Path) -> None:
    n, per_round, rounds = 240, 40, 2
    spec = FleetSpec(broker_url=mosquitto.url, federation="shared", devices=n, processes=2, seed=1,
                     work_dir=tmp_path / "fleet", connect_spread_s=1.0, network="shared", step_threads=8,
                     heterogeneity=Heterogeneity(compute_s=0.1))
    cfg = config_from_dict({
        "federation": "shared", "task": "digits-logreg", "rounds": rounds, "seed": 2,
        "state_dir": str(tmp_path / "coord"), "broker": {"url": mosquitto.url},
        "round": {"devices_per_round": per_round, "over_selection": 1.0, "deadline_s": 60.0, "min_devices": n,
                  "wait_for_devices_s": 90.0},
        "plan": {"local_epochs": 2, "lr": 0.2, "density": 0.5},
        "evaluation": {"data": str(tmp_path / "fleet" / "test.npz")}, "publish": {"onnx": False}})
    with Fleet(spec) as fleet:
        assert fleet.wait_connected(n, 90.0), fleet.totals()
        result = Coordinator(cfg).run()
        # every accepted update's receipt reached its device and was committed there
        assert fleet.wait_totals(lambda t: t["counters"].get("accepted", 0) >= per_round * rounds, 30.0), \
            fleet.totals()
        threads = [s["threads"] for s in fleet.latest.values()]
        devices = fleet.stop()
    assert [r.state for r in result.records] == ["closed"] * rounds
    assert all(r.accepted == per_round and r.participants == per_round for r in result.records)
    assert len(devices) == n
    sent = sum(d["counters"].get("updates_sent", 0) for d in devices)
    accepted = sum(d["counters"].get("accepted", 0) for d in devices)
    assert sent == accepted == per_round * rounds
    assert not any(d["counters"].get("rolled_back", 0) for d in devices)
    # 120 connections per worker, driven by one network thread and 8 step threads (plus a
    # few: main, ticker, stdout reader), not two threads per device
    assert all(t < 40 for t in threads), threads


def test_shared_network_refuses_availability_periods(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text('broker_url = "mqtt://127.0.0.1:1"\nfederation = "f"\ndevices = 10\nwork_dir = "w"\n'
                    'network = "shared"\n[heterogeneity]\nonline_fraction = 0.5\n')
    with pytest.raises(ConfigError, match="always-online"):
        load_fleet_spec(path)
