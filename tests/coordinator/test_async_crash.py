"""Buffered asynchronous mode end to end: virtual devices (the real edge agent) and the
coordinator CLI over mosquitto; kill -9 of the coordinator while a buffer is part full."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import numpy as np
import tomli_w

from coordinator.state import StateDB, load_checkpoint
from fleet.fleet import Fleet, FleetSpec, Heterogeneity

K, STEPS, N = 4, 3, 8


def _write_config(tmp_path: Path, url: str, task_timeout_s: float = 120.0) -> Path:
    cfg = tmp_path / "coordinator.toml"
    cfg.write_text(tomli_w.dumps({
        "federation": "buf", "task": "digits-logreg", "rounds": STEPS, "seed": 1, "state_dir": "state",
        "broker": {"url": url, "protocol": "5"},
        "round": {"mode": "async"},
        "async": {"buffer_size": K, "concurrency": N, "max_staleness": 50, "task_timeout_s": task_timeout_s},
        "plan": {"local_epochs": 2, "lr": 0.2, "density": 0.5},
        "evaluation": {"data": str(tmp_path / "fleet" / "test.npz")}, "publish": {"onnx": False}}))
    return cfg


def _fleet_spec(tmp_path: Path, url: str) -> FleetSpec:
    return FleetSpec(broker_url=url, federation="buf", devices=N, processes=1, seed=5, work_dir=tmp_path / "fleet",
                     edge={"receipt_timeout": 5.0}, heterogeneity=Heterogeneity(compute_s=0.5, speed_sigma=0.6))


def _restart_to_the_end(coordinator_cli, cfg: Path, fleet: Fleet, timeout: float) -> list[dict]:
    """Start the coordinator again, let it run every step, stop the fleet: its devices' totals."""
    proc = coordinator_cli(cfg)
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    # every receipt sent reaches its device
    fleet.wait_totals(lambda t: t["counters"].get("accepted", 0) >= K * STEPS, 30.0)
    return fleet.stop()


def _every_step_counted_once(tmp_path: Path, devices: list[dict]) -> dict[int, list]:
    """The fault suite's invariants after the run: every step closed with K updates, no transfer
    counted twice, and the devices were told what was counted. Returns the participations by step."""
    final = load_checkpoint(tmp_path / "state")
    assert final.round == STEPS and final.version == STEPS and np.isfinite(final.model).all()
    db = StateDB(tmp_path / "state")
    try:
        rounds = db.rounds()
        parts = {r["round"]: db.participations(r["round"]) for r in rounds}
    finally:
        db.close()
    assert [(r["round"], r["state"], r["accepted"]) for r in rounds] == [(s, "closed", K) for s in range(1, STEPS + 1)]
    accepted = [(p.device, p.transfer_id) for s in parts for p in parts[s] if p.status == "accepted"]
    assert len(accepted) == len(set(accepted)) == K * STEPS  # no transfer counted twice
    assert sum(d["counters"].get("accepted", 0) for d in devices) == K * STEPS
    return parts


def _journal_files(tmp_path: Path, step: int) -> list[str]:
    folder = tmp_path / "state" / "buffer" / str(step)
    return sorted(p.name for p in folder.glob("*.bin")) if folder.is_dir() else []


def _kill_at(point: str, round_: int, tmp_path: Path, cfg: Path, coordinator_cli, monkeypatch, what: str) -> None:
    """Start the coordinator CLI paused at ``point`` of step ``round_`` (its test hook), kill -9
    it there, and clear the hook for the restart; ``what`` names the step in a failure."""
    pause = tmp_path / "paused"
    monkeypatch.setenv("FEDMQ_COORDINATOR_TEST_PAUSE_AT", point)
    monkeypatch.setenv("FEDMQ_COORDINATOR_TEST_PAUSE_ROUND", str(round_))
    monkeypatch.setenv("FEDMQ_COORDINATOR_TEST_PAUSE_FILE", str(pause))
    proc = coordinator_cli(cfg)
    deadline = time.monotonic() + 90.0
    while not pause.exists():
        assert time.monotonic() < deadline and proc.poll() is None, what
        time.sleep(0.01)  # a file another process writes; the deadline bounds it
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    for name in ("AT", "ROUND", "FILE"):
        monkeypatch.delenv(f"FEDMQ_COORDINATOR_TEST_PAUSE_{name}")


def test_async_coordinator_killed_mid_buffer_resumes_without_double_counting(mosquitto, tmp_path: Path,
                                                                          coordinator_cli, monkeypatch) -> None:
    """Killed once the buffer of step 2 holds its first update (journaled, receipt not sent;
    step 1 is checkpointed). The kill point is the coordinator's ``accepted`` pause: polling
    the journal from here raced the coordinator, which at times journaled the whole buffer
    between two polls."""
    spec = _fleet_spec(tmp_path, mosquitto.url)
    cfg = _write_config(tmp_path, mosquitto.url)
    with Fleet(spec) as fleet:
        assert fleet.wait_connected(N, 60.0), fleet.totals()
        _kill_at("accepted", 2, tmp_path, cfg, coordinator_cli, monkeypatch, "step 2 never started filling")
        journaled = _journal_files(tmp_path, 2)
        assert load_checkpoint(tmp_path / "state").round == 1
        assert len(journaled) == 1, journaled  # the kill came mid-buffer, its first update journaled
        devices = _restart_to_the_end(coordinator_cli, cfg, fleet, timeout=180)

    parts = _every_step_counted_once(tmp_path, devices)
    step2 = {f"{d}+{t}.bin" for d, t in ((p.device, p.transfer_id) for p in parts[2] if p.status == "accepted")}
    assert {name.split("+", 1)[1] for name in journaled} <= step2  # the journal was replayed, not lost
    assert not (tmp_path / "state" / "buffer" / "2").exists()


def test_async_coordinator_killed_between_a_step_and_the_next_tasks_frees_every_answered_device(
        mosquitto, tmp_path: Path, coordinator_cli, monkeypatch) -> None:
    """Killed after step 1's model is published, before any task of step 2 is sent: every
    device still holds its round-1 task in the database. After the restart the devices that
    answered round 1 are free at once and the others as soon as they resend, so the run ends
    long before the leases (600 s) run out. (Before task rounds were recorded, every such
    device stayed busy for a whole new lease: the run stalled.)"""
    spec = _fleet_spec(tmp_path, mosquitto.url)
    cfg = _write_config(tmp_path, mosquitto.url, task_timeout_s=600.0)
    with Fleet(spec) as fleet:
        assert fleet.wait_connected(N, 60.0), fleet.totals()
        _kill_at("model_published", 1, tmp_path, cfg, coordinator_cli, monkeypatch, "step 1 never published its model")
        assert load_checkpoint(tmp_path / "state").round == 1
        db = StateDB(tmp_path / "state")
        try:
            leases = db.task_leases()
        finally:
            db.close()
        assert sorted(leases) == [f"vd-{i:05d}" for i in range(N)] and {r for r, _ in leases.values()} == {1}
        devices = _restart_to_the_end(coordinator_cli, cfg, fleet, timeout=150)

    _every_step_counted_once(tmp_path, devices)
    db = StateDB(tmp_path / "state")
    try:
        assert db.task_leases() == {}
    finally:
        db.close()


def test_update_staler_than_the_maximum_is_rejected_and_rolled_back_into_the_residual(mosquitto,
                                                                                    tmp_path: Path) -> None:
    from coordinator.service import make_coordinator
    from coordinator.config import config_from_dict

    spec = FleetSpec(broker_url=mosquitto.url, federation="stale", devices=6, processes=1, seed=2,
                     work_dir=tmp_path / "fleet", heterogeneity=Heterogeneity(compute_s=0.3, speed_sigma=0.8))
    cfg = config_from_dict({
        "federation": "stale", "task": "digits-logreg", "rounds": 4, "seed": 1, "state_dir": str(tmp_path / "state"),
        "broker": {"url": mosquitto.url}, "round": {"mode": "async"},
        # six devices train at once and the model steps every two updates: most updates
        # arrive one or more steps stale, and no staleness is allowed
        "async": {"buffer_size": 2, "concurrency": 6, "max_staleness": 0},
        "plan": {"local_epochs": 1, "lr": 0.2, "density": 0.5}, "publish": {"onnx": False}})
    with Fleet(spec) as fleet:
        assert fleet.wait_connected(6, 60.0), fleet.totals()
        result = make_coordinator(cfg).run()
        devices = fleet.stop()
    stale = sum(r.rejected.get("stale", 0) for r in result.records)
    assert [r.accepted for r in result.records] == [2] * 4 and stale > 0
    parts = [p for r in result.records for p in r.participations]
    assert all(p.metrics["staleness"] == 0 for p in parts if p.status == "accepted")
    # every stale receipt made its device put the update back into the residual
    assert sum(d["counters"].get("rolled_back", 0) for d in devices) >= stale
    assert sum(d["counters"].get("rejected", 0) for d in devices) >= stale
