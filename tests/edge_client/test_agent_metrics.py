"""The edge agent's optional Prometheus endpoint (``metrics_port``): an agent thread on the
in-memory bus serves its counters and state over HTTP; a malformed task it ignores shows up."""

from __future__ import annotations

import threading
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker.launch import free_port
from edge_client.agent import EdgeAgent
from edge_client.config import load_config
from fedmq.wire import topics
from fedmq.data import digits_split, save_npz_atomic
from fedmq.errors import ConfigError
from fedmq.transport.memory import drop_bus, get_bus
from tests.waiting import until


def _config(tmp_path: Path, bus: str, **extra: object) -> Path:
    x, y, _, _ = digits_split()
    save_npz_atomic(tmp_path / "data.npz", x[:100], y[:100])
    lines = "".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in extra.items())
    path = tmp_path / "edge.toml"
    path.write_text(f'device_id = "pi-01"\nfederation = "lab"\ntask = "digits-logreg"\ndata = "data.npz"\n'
                    f'state_dir = "state"\n{lines}[broker]\nurl = "memory://{bus}"\n')
    return path


def _scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}


def _until(condition, timeout: float = 30.0):
    value = until(condition, timeout)
    assert value, "timed out"
    return value


def test_agent_serves_its_counters_and_state(tmp_path: Path) -> None:
    bus_name = f"edge-metrics-{time.monotonic_ns()}"
    port = free_port()
    agent = EdgeAgent(load_config(_config(tmp_path, bus_name, metrics_port=port), environ={}), environ={})
    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stop,), daemon=True)
    thread.start()
    try:
        bus = get_bus(bus_name)
        _until(lambda: topics.status("lab", "pi-01") in bus.retained())
        first = _until(lambda: _try_scrape(port))
        assert first["fedmq_edge_connected"] == 1.0 and first["fedmq_edge_bad_messages_total"] == 0.0
        assert first["fedmq_edge_last_round"] == -1.0 and first["fedmq_edge_update_in_flight"] == 0.0
        # A task that is not msgpack: ignored and counted.
        with bus.link("tester") as tester:
            tester.publish(topics.task("lab", "pi-01"), b"\xc1 not a task")
        _until(lambda: _scrape(port)["fedmq_edge_bad_messages_total"] == 1.0)
    finally:
        stop.set()
        thread.join(timeout=30)
        drop_bus(bus_name)
    assert not thread.is_alive()
    with pytest.raises(OSError):  # the endpoint went with the agent
        _scrape(port)


def _try_scrape(port: int) -> dict[str, float] | None:
    try:
        return _scrape(port)
    except OSError:
        return None


def test_metrics_are_off_by_default_and_a_bad_port_is_named(tmp_path: Path) -> None:
    cfg = load_config(_config(tmp_path, "unused"), environ={})
    assert (cfg.metrics_port, cfg.metrics_address) == (0, "127.0.0.1")
    with pytest.raises(ConfigError, match="metrics_port"):
        load_config(_config(tmp_path, "unused"), environ={"FEDMQ_EDGE_METRICS_PORT": "70000"})
