"""The coordinator's Prometheus metrics: a real Prometheus server (Debian's `prometheus`
binary, started by the test on a free loopback port) scrapes the coordinator during a short
federation, and what its HTTP API answers equals the run's round records."""

from __future__ import annotations

import io
import json
import math
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from broker.launch import free_port
from coordinator.config import config_from_dict
from coordinator.metrics import CoordinatorMetrics
from fedmq.errors import ConfigError
from fleet.demo import DemoSettings, Scheduling, run_demo

PROMETHEUS = Path("/usr/bin/prometheus")


class Prometheus:
    """A Prometheus server scraping ``targets`` every 200 ms, with its data in ``folder``."""

    def __init__(self, folder: Path, targets: list[str]) -> None:
        assert PROMETHEUS.is_file(), f"{PROMETHEUS} missing: install Debian's prometheus package (./run.sh test does)"
        folder.mkdir(parents=True, exist_ok=True)
        config = folder / "prometheus.yml"
        config.write_text("global:\n  scrape_interval: 200ms\n  scrape_timeout: 200ms\n"
                          "scrape_configs:\n  - job_name: fedmq-coordinator\n    metrics_path: /metrics\n"
                          f"    static_configs:\n      - targets: {json.dumps(targets)}\n")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = folder / "prometheus.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [str(PROMETHEUS), f"--config.file={config}", f"--storage.tsdb.path={folder / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"], stdout=out, stderr=subprocess.STDOUT)
        wait_until(self._ready, 30.0, "Prometheus ready", self.log)

    def _ready(self) -> bool:
        assert self.proc.poll() is None, f"prometheus exited {self.proc.returncode}: {self.log.read_text()[-2000:]}"
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, ConnectionError, socket.timeout):
            return False

    def query(self, expr: str) -> dict[tuple[tuple[str, str], ...], float]:
        """Instant query: label set (without __name__, job, instance) -> value."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=5) as resp:
            doc = json.load(resp)
        assert doc["status"] == "success", doc
        out = {}
        for item in doc["data"]["result"]:
            labels = tuple(sorted((k, v) for k, v in item["metric"].items()
                                  if k not in ("__name__", "job", "instance")))
            out[labels] = float(item["value"][1])
        return out

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


def wait_until(condition: Callable[[], Any], timeout: float, what: str, log: Path | None = None) -> Any:
    end = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > end:
            tail = f"\n{log.read_text()[-2000:]}" if log is not None and log.exists() else ""
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{tail}")
        time.sleep(0.1)  # polling interval of a bounded wait, not a synchronisation


@pytest.fixture
def metrics() -> Iterator[CoordinatorMetrics]:
    m = CoordinatorMetrics()
    m.serve("127.0.0.1", 0)
    yield m
    m.close()


@pytest.fixture
def prometheus(tmp_path: Path, metrics: CoordinatorMetrics) -> Iterator[Prometheus]:
    assert metrics.server is not None
    p = Prometheus(tmp_path / "prometheus", [f"127.0.0.1:{metrics.server.port}"])
    yield p
    p.close()


def test_prometheus_scrapes_the_values_of_the_run(tmp_path: Path, metrics: CoordinatorMetrics,
                                                  prometheus: Prometheus) -> None:
    # Prometheus has scraped the endpoint before any round: the target is up, counters at 0.
    wait_until(lambda: prometheus.query("up") == {(): 1.0}, 30.0, "the first scrape", prometheus.log)
    assert prometheus.query("fedmq_rounds_total") == {(("state", "closed"),): 0.0, (("state", "failed"),): 0.0}

    summary = run_demo(DemoSettings(
        devices=3, per_round=3, rounds=3, task="digits-mlp", data="digits", seed=0, broker="memory",
        devices_in="threads", deadline_s=300.0, train_plan={"local_epochs": 1},
        scheduling=Scheduling(over_selection=1.0, min_devices=3, min_updates=2), publish_onnx=False,
        write_files=False, out=tmp_path / "demo"), console=Console(file=io.StringIO()), metrics=metrics)
    records = summary["records"]
    assert len(records) == 3
    last = records[-1]
    expected = {
        "fedmq_rounds_total": {(("state", "closed"),): sum(r["state"] == "closed" for r in records),
                               (("state", "failed"),): sum(r["state"] == "failed" for r in records)},
        "fedmq_updates_accepted_total": {(): sum(r["accepted"] for r in records)},
        "fedmq_model_version": {(): last["model_version"]},
        "fedmq_bytes_total": {(("direction", "up"),): sum(r["bytes_up"] for r in records),
                              (("direction", "down"),): sum(r["bytes_down"] for r in records)},
        "fedmq_round_duration_seconds_count": {(): 3},
        "fedmq_devices_selected": {(): last["participants"]},
        "sum(fedmq_updates_rejected_total)": {(): sum(sum(r["rejected"].values()) for r in records)},
        "fedmq_test_accuracy": {(): last["test_accuracy"]},
        "fedmq_test_loss": {(): last["test_loss"]},
    }
    assert expected["fedmq_model_version"][()] == 3 and expected["fedmq_updates_accepted_total"][()] >= 6
    assert expected["fedmq_bytes_total"][(("direction", "up"),)] > 0

    def scraped() -> dict[str, Any] | None:
        got = {expr: prometheus.query(expr) for expr in expected}
        return got if all(_close(got[e], expected[e]) for e in expected) else None

    try:
        wait_until(scraped, 30.0, "the final values in Prometheus")
    except AssertionError:
        got = {expr: prometheus.query(expr) for expr in expected}
        raise AssertionError(f"Prometheus answers {got}, the records say {expected}") from None
    # The duration histogram holds the records' wall times.
    assert prometheus.query("fedmq_round_duration_seconds_sum")[()] == pytest.approx(
        sum(r["wall_s"] for r in records), rel=1e-6)
    assert 0.0 <= prometheus.query("fedmq_test_accuracy")[()] <= 1.0


def _close(got: dict, want: dict) -> bool:
    return got.keys() == want.keys() and all(math.isclose(got[k], want[k], rel_tol=1e-9) for k in want)


def test_metrics_config_is_off_by_default_and_validated() -> None:
    base = {"federation": "f", "task": "digits-mlp"}
    cfg = config_from_dict(base)
    assert (cfg.metrics.port, cfg.metrics.address) == (0, "127.0.0.1")
    assert config_from_dict(dict(base, metrics={"port": 9464, "address": "0.0.0.0"})).metrics.port == 9464
    with pytest.raises(ConfigError, match=r"metrics\.port: Input should be less than or equal to 65535"):
        config_from_dict(dict(base, metrics={"port": 70000}))
    with pytest.raises(ConfigError, match=r"metrics\.bind: unknown option"):
        config_from_dict(dict(base, metrics={"bind": "0.0.0.0"}))


def test_a_port_in_use_is_a_config_error_naming_the_option() -> None:
    first = CoordinatorMetrics()
    server = first.serve("127.0.0.1", 0)
    try:
        with pytest.raises(ConfigError, match=rf"metrics\.port: cannot serve metrics on 127\.0\.0\.1:{server.port}: "
                                              r"address already in use"):
            CoordinatorMetrics().serve("127.0.0.1", server.port)
    finally:
        first.close()


def test_two_coordinators_in_one_process_keep_their_own_numbers() -> None:
    a, b = CoordinatorMetrics(), CoordinatorMetrics()
    a.model_version.set(7)
    assert a.registry.get_sample_value("fedmq_model_version") == 7
    assert b.registry.get_sample_value("fedmq_model_version") == 0
