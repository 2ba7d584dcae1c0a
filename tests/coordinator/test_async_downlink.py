"""Buffered asynchronous mode with the compressed downlink (and with a dense one): devices
that train from whichever version is newest when they are free hold, bit for bit, the
global model the coordinator published for that version."""

from __future__ import annotations

import secrets
from pathlib import Path

import numpy as np
import pytest

from coordinator.buffered import BufferedRounds
from coordinator.service import make_coordinator
from coordinator.config import config_from_dict
from coordinator.service import Progress
from coordinator.state import load_checkpoint
from fedmq.fl.chain import ModelChain
from fedmq.fl.downlink import params_sha256
from fedmq.wire import topics
from fedmq.transport.memory import get_bus
from tests.coordinator.downlink_fleet import TASK, device_threads, hashes_match

STEPS, K, N = 5, 2, 4


@pytest.mark.parametrize("codec", ["topk-int8", "none"])
def test_async_steps_reach_devices_through_the_configured_downlink(tmp_path: Path, codec: str) -> None:
    bus_name = f"adl-{secrets.token_hex(4)}"
    url, fed = f"memory://{bus_name}", "adl"
    cfg = config_from_dict({
        "federation": fed, "task": TASK, "rounds": STEPS, "seed": 3, "state_dir": str(tmp_path / "coord"),
        "broker": {"url": url, "protocol": "5"}, "round": {"mode": "async"},
        "async": {"buffer_size": K, "concurrency": N, "max_staleness": 10, "task_timeout_s": 30.0},
        "plan": {"density": 0.1, "lr": 0.1}, "publish": {"onnx": False},
        "downlink": {"codec": codec, "density": 0.05, "window": 3, "snapshot_every": 3}})
    fleet = device_threads(tmp_path, url, "5", fed, N)
    for i in range(N):
        fleet.start(i)
    coord = make_coordinator(cfg)
    assert isinstance(coord.policy, BufferedRounds)
    published: dict[int, str] = {}

    def on(p: Progress) -> None:
        if p.kind == "round_closed" and p.record is not None:
            published[p.record.model_version] = params_sha256(coord.driver.vector)

    try:
        result = coord.run(on)
    finally:
        fleet.stop_all()
    assert [(r.state, r.accepted) for r in result.records] == [("closed", K)] * STEPS
    assert result.version == STEPS and published[STEPS] == params_sha256(result.vector)
    # Every device trained from exactly the model published for the version its task named.
    assert hashes_match(fleet.agents, published) == []
    trained = [v for a in fleet.agents.values() for v, _ in a.trained_from.values()]
    assert len(trained) >= STEPS * K and max(trained) >= 2
    assert all(r.bytes_down > 0 for r in result.records)
    ckpt = load_checkpoint(cfg.state_dir)
    retained = get_bus(bus_name).retained()
    if codec == "none":
        assert ckpt.downlink_residual is None
        assert not (cfg.state_dir / "downlink").exists()
        assert topics.model_chain(fed) not in retained
        return
    # Server-side error feedback: what the compressed deltas have not sent yet is kept.
    assert ckpt.downlink_residual is not None and np.any(ckpt.downlink_residual)
    assert sum(a.counters["deltas_applied"] for a in fleet.agents.values()) > 0
    assert all(a.counters["downlink_fallbacks"] == 0 for a in fleet.agents.values())
    chain = ModelChain.from_bytes(retained[topics.model_chain(fed)])
    assert chain.latest == STEPS and chain.latest_sha256 == published[STEPS]
    assert [e.version for e in chain.deltas] == [3, 4, 5]
    assert sorted(p.name for p in (cfg.state_dir / "downlink").glob("delta-*.bin")) == \
        ["delta-3.bin", "delta-4.bin", "delta-5.bin"]
