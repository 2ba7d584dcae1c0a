"""The fleet simulator: virtual devices (the real edge agent) against mosquitto."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from coordinator.config import config_from_dict
from coordinator.service import Coordinator
from fedmq.data import load_npz
from fedmq.errors import ConfigError
from fleet.fleet import Fleet, FleetSpec, Heterogeneity, availability, device_profiles, dropout_draws, prepare

HET = Heterogeneity(compute_s=0.5, speed_sigma=1.0, online_fraction=0.8, mean_online_s=60.0, dropout=0.1,
                    bandwidth=1e5, bandwidth_sigma=0.5, latency_s=0.05)


def spec(tmp_path: Path, seed: int = 3, devices: int = 400, **kw) -> FleetSpec:
    return FleetSpec(broker_url="mqtt://127.0.0.1:1", federation="f", devices=devices, seed=seed,
                     work_dir=tmp_path / f"fleet-{seed}", heterogeneity=HET, **kw)


def periods(s: FleetSpec, index: int, n: int) -> list[tuple[bool, float]]:
    it = availability(s, index)
    return [next(it) for _ in range(n)]


def test_heterogeneity_is_reproducible_from_the_seed(tmp_path: Path) -> None:
    a, b, other = spec(tmp_path), spec(tmp_path), spec(tmp_path, seed=4)
    assert device_profiles(a) == device_profiles(b)
    assert device_profiles(a) != device_profiles(other)
    assert [periods(a, i, 6) for i in range(20)] == [periods(b, i, 6) for i in range(20)]
    assert periods(a, 0, 6) != periods(other, 0, 6)
    da, db = dropout_draws(a, 7), dropout_draws(b, 7)
    assert [next(da) for _ in range(50)] == [next(db) for _ in range(50)]
    # the draws follow the configured distributions
    slow = np.array([p.slowdown for p in device_profiles(a)])
    assert abs(np.median(np.log(slow))) < 0.2 and 0.85 < np.log(slow).std() < 1.15
    starts = np.array([periods(a, i, 1)[0][0] for i in range(a.devices)])
    assert 0.72 < starts.mean() < 0.88
    drops = dropout_draws(a, 1)
    assert 0.05 < np.mean([next(drops)[0] for _ in range(2000)]) < 0.15


def test_local_data_is_a_function_of_seed_and_index(tmp_path: Path) -> None:
    a, b = spec(tmp_path, devices=3), spec(tmp_path, devices=3)
    a = a.model_copy(update={"work_dir": tmp_path / "a"})
    b = b.model_copy(update={"work_dir": tmp_path / "b"})
    prepare(a), prepare(b)
    for i in range(3):
        xa, ya = load_npz(a.work_dir / "devices" / a.device_id(i) / "data.npz")
        xb, yb = load_npz(b.work_dir / "devices" / b.device_id(i) / "data.npz")
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb) and len(ya) == a.samples_per_device
    with pytest.raises(ConfigError, match="samples_per_device"):
        prepare(a.model_copy(update={"samples_per_device": 10_000}))


def test_200_virtual_devices_run_a_federation_against_mosquitto(mosquitto, tmp_path: Path) -> None:
    n = 200
    fleet_spec = FleetSpec(broker_url=mosquitto.url, federation="big", devices=n, processes=2, seed=1,
                           work_dir=tmp_path / "fleet", connect_spread_s=2.0,
                           heterogeneity=Heterogeneity(compute_s=0.2, speed_sigma=0.5))
    cfg = config_from_dict({
        "federation": "big", "task": "digits-logreg", "rounds": 3, "seed": 2, "state_dir": str(tmp_path / "coord"),
        "broker": {"url": mosquitto.url},
        "round": {"devices_per_round": 20, "over_selection": 1.0, "deadline_s": 30.0, "min_devices": n,
                  "wait_for_devices_s": 90.0},
        "plan": {"local_epochs": 2, "lr": 0.2, "density": 0.5},
        "evaluation": {"data": str(tmp_path / "fleet" / "test.npz")}, "publish": {"onnx": False}})
    with Fleet(fleet_spec) as fleet:
        assert fleet.wait_connected(n, 90.0), fleet.totals()
        result = Coordinator(cfg).run()
        totals = fleet.totals()
        devices = fleet.stop()
    assert [r.state for r in result.records] == ["closed"] * 3
    assert all(r.accepted == 20 and r.participants == 20 for r in result.records)
    assert result.records[-1].test_accuracy > result.records[0].test_accuracy
    assert len(devices) == n
    trained = {d["device"] for d in devices if d["trainings"]}
    accepted_db = {p.device for r in result.records for p in r.participations if p.status == "accepted"}
    assert accepted_db <= trained and len(accepted_db) >= 40
    assert sum(d["counters"].get("accepted", 0) for d in devices) == 60
    # memory: the workers' proportional set size, per virtual device (torch and the task
    # code are shared by every device of a process)
    assert totals["pss"] / n < 4 * 1024, totals


def test_more_threaded_devices_per_process_than_select_can_watch_is_refused(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from fleet.fleet import MAX_THREADED_PER_PROCESS, min_processes

    with pytest.raises(ValidationError, match=r"500 per process.*select\(\).*processes >= 5"):
        spec(tmp_path, devices=1000, processes=2)
    assert spec(tmp_path, devices=1000, processes=min_processes(1000)).processes == 5
    assert min_processes(MAX_THREADED_PER_PROCESS) == 1 and min_processes(MAX_THREADED_PER_PROCESS + 1) == 2
    # the shared network loop waits with a selector (epoll): no such limit
    shared = FleetSpec(broker_url="mqtt://127.0.0.1:1", federation="f", devices=1000, processes=1,
                       work_dir=tmp_path / "shared", network="shared")
    assert shared.processes == 1
