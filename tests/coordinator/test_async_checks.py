"""Buffered asynchronous mode judges client updates as synchronous rounds do: with the
default ``[limits]`` (no explicit norm bound) an enormous update, an over-weighted claim and
a NaN are rejected, the accepted norms are checkpointed and a restart resumes them; its
Prometheus metrics are served on ``[metrics] port`` and add up to the step records.

Devices are tests/coordinator/sim_device.py processes over a real mosquitto."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from broker.launch import free_port
from coordinator.service import make_coordinator
from coordinator.config import config_from_dict
from coordinator.service import Progress
from coordinator.state import load_checkpoint

SIM = Path(__file__).with_name("sim_device.py")
ROOT = Path(__file__).resolve().parents[2]
TASK = "digits-logreg"


def start_ready(broker, fed: str, specs: list[tuple[str, str, int]]) -> list[subprocess.Popen]:
    """Start sim devices and wait until each has published its online status."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(SIM), broker.url, broker.protocol, fed, name, mode, TASK, str(n)],
                              env=env, stdout=subprocess.PIPE, text=True) for name, mode, n in specs]
    for proc, (name, _, _) in zip(procs, specs):
        ready, _, _ = select.select([proc.stdout], [], [], 120.0)
        assert ready and proc.stdout.readline().strip() == "ready", f"{name} did not start"
    return procs


def stop_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait(timeout=10)


def config(broker, state: Path, fed: str, rounds: int, **extra):
    return config_from_dict({
        "federation": fed, "task": TASK, "rounds": rounds, "seed": 3, "state_dir": str(state),
        "broker": {"url": broker.url, "protocol": broker.protocol}, "round": {"mode": "async"},
        "async": {"buffer_size": 2, "concurrency": 5, "task_timeout_s": 60.0},
        "plan": {"density": 0.1, "dense_below": 16}, "publish": {"onnx": False}, "downlink": {"codec": "none"},
        **extra})


def test_default_limits_protect_async_mode_and_the_norms_survive_a_restart(mosquitto, tmp_path):
    fed = "apoison"
    specs = [("good-0", "good", 30), ("good-1", "good", 90), ("huge-0", "huge", 10), ("fat-0", "overweight", 10),
             ("nan-0", "nan", 10)]
    devices = start_ready(mosquitto, fed, specs)
    state = tmp_path / "state"
    try:
        first = make_coordinator(config(mosquitto, state, fed, rounds=3)).run()
        norms = json.loads(load_checkpoint(state).meta["norms"])
        second = make_coordinator(config(mosquitto, state, fed, rounds=4)).run()
    finally:
        stop_all(devices)
    records = first.records + second.records
    assert [r.round for r in records] == [1, 2, 3, 4] and all(r.state == "closed" for r in records)
    parts = [p for r in records for p in r.participations]
    assert {p.device for p in parts if p.status == "accepted"} == {"good-0", "good-1"}
    reasons = {(p.device, p.reason) for p in parts if p.status == "rejected"}
    # With no limits.norm_bound set: the data-set bound (norm_bound_initial during its warm-up).
    assert {("huge-0", "norm_bound"), ("fat-0", "over_weighted"), ("nan-0", "non_finite")} <= reasons
    assert np.isfinite(second.vector).all() and float(np.abs(second.vector).max()) < 10.0
    # The accepted norms are in the checkpoint, and the restarted run appended to them.
    assert len(norms) == 6 and all(0 < n < 1000 for n in norms)
    resumed = json.loads(load_checkpoint(state).meta["norms"])
    assert len(resumed) == 8 and resumed[:6] == norms


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_async_steps_feed_the_metrics_served_on_the_configured_port(mosquitto, tmp_path):
    fed = "ametrics"
    devices = start_ready(mosquitto, fed, [(f"good-{i}", "good", 10 * (i + 1)) for i in range(3)])
    port = free_port()
    cfg = config(mosquitto, tmp_path / "state", fed, rounds=3, metrics={"port": port})
    seen: list[tuple[str, int]] = []
    scraped: dict = {}

    def on(p: Progress) -> None:
        seen.append((p.kind, p.round))
        if p.kind == "round_closed" and p.round == 3:
            scraped.update(scrape(port))  # served while the run is on, from the round thread's events

    try:
        result = make_coordinator(cfg).run(on)
    finally:
        stop_all(devices)
    recs = result.records
    assert [k for k in seen if k[0] == "round_closed"] == [("round_closed", s) for s in (1, 2, 3)]
    assert scraped[("fedmq_rounds_total", (("state", "closed"),))] == 3
    assert scraped[("fedmq_updates_accepted_total", ())] == sum(r.accepted for r in recs) == 6
    assert scraped[("fedmq_model_version", ())] == 3
    assert scraped[("fedmq_bytes_total", (("direction", "up"),))] == sum(r.bytes_up for r in recs) > 0
    assert scraped[("fedmq_round_duration_seconds_count", ())] == 3
    assert scraped[("fedmq_devices_online", ())] == 3
