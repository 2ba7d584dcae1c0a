"""Scaffold on the coordinator (coordinator/scaffold.py): the control payload judged like an
update, ``c`` checkpointed with the global model, and whole federations that learn with it on
the in-memory bus and through mosquitto (a coordinator restart keeps ``c``)."""

from __future__ import annotations

import io
import secrets
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from coordinator.scaffold import C_SERVER, ScaffoldServer
from coordinator.service import Coordinator, Progress
from coordinator.state import Checkpoint, load_checkpoint, save_checkpoint
from fedmq.codecs import CodecSpec, decode_sparse, encode
from fedmq.fl.control_chain import fetch_control
from fedmq.wire.envelope import ClientUpdate, encode_update
from fedmq.fl.downlink import params_sha256
from fedmq.fl.rounds import Accepted, Rejected, RoundEngine, UpdateChecks
from fedmq.model.params import ParamSpec
from fleet.demo import DemoSettings, Scheduling, run_demo
from tests.coordinator.downlink_fleet import coordinator_config, device_threads

SPEC = ParamSpec(("w",), ((1200,),), ("float32",))
CODEC = CodecSpec.of(density=0.1, dense_below=0)


def _server(tmp: Path, **kw) -> ScaffoldServer:
    opts = dict(window=4, snapshot_every=2, fleet_size=lambda: 4, norm_factor=10.0, norm_warmup=2)
    opts.update(kw)
    return ScaffoldServer(SPEC, "f", tmp, CODEC, **opts)


def _update(device: str, control: bytes = b"", scale: float = 1.0) -> bytes:
    x = np.random.default_rng(len(device)).standard_normal(SPEC.size).astype(np.float32) * scale
    return encode_update(ClientUpdate("f", device, 1, 0, 10, "delta", SPEC.hash, "topk-int8", encode(x, SPEC, CODEC),
                                      control=control))


def _engine(server: ScaffoldServer) -> RoundEngine:
    engine = RoundEngine("f", SPEC, kind="delta", is_known=lambda d: True, max_update_bytes=1 << 20,
                         checks=server.checks(UpdateChecks()))
    engine.open(1, 0, ["a", "b", "c", "d", "e", "g"], 10, deadline=100.0, started=0.0)
    return engine


def test_a_bad_control_change_is_rejected_like_a_bad_update(tmp_path: Path) -> None:
    server = _server(tmp_path)
    engine = _engine(server)
    change = np.zeros(SPEC.size, np.float32)
    change[:4] = [1.0, -1.0, 0.5, 2.0]
    good = encode(change, SPEC, CODEC)
    assert isinstance(engine.offer("a", "t1", _update("a", good)), Accepted)
    assert isinstance(engine.offer("b", "t2", _update("b", good)), Accepted)
    assert isinstance(engine.offer("c", "t3", _update("c")), Accepted)  # a device without Scaffold
    assert server.round_sum.count == 2
    np.testing.assert_allclose(server.round_sum.total[:4], 2 * change[:4], rtol=0.02)
    nan = bytearray(good)
    kept = decode_sparse("topk-int8", good, SPEC).values.size
    scale_at = len(good) - kept - 4  # one tensor, one block: its fp32 scale, then the int8 values
    nan[scale_at:scale_at + 4] = struct.pack("<f", float("nan"))
    bad = {"d": (bytes(nan), "non_finite"), "e": (b"\x07garbage", "malformed"),
           "g": (encode(change * 1000, SPEC, CODEC), "norm_bound")}
    for i, (device, (control, why)) in enumerate(bad.items()):
        out = engine.offer(device, f"x{i}", _update(device, control))
        assert isinstance(out, Rejected) and out.reason == why, (device, out)
        assert "control variate change" in out.detail
    assert server.round_sum.count == 2  # nothing of a rejected update reaches c


def test_c_steps_by_the_sum_over_n_and_survives_the_checkpoint(tmp_path: Path) -> None:
    server = _server(tmp_path)
    engine = _engine(server)
    change = np.zeros(SPEC.size, np.float32)
    change[:3] = [4.0, -4.0, 8.0]
    for device in ("a", "b"):
        engine.offer(device, f"t-{device}", _update(device, encode(change, SPEC, CODEC)))
    server.step(1)
    np.testing.assert_allclose(server.c[:3], 2 * change[:3] / 4, rtol=0.02)  # sum / N with N = 4
    assert (tmp_path / "downlink" / "control-delta-1.bin").exists()
    arrays = dict(server.state_arrays())
    save_checkpoint(tmp_path, Checkpoint(1, 1, np.zeros(SPEC.size, np.float32), arrays, {}))
    resumed = _server(tmp_path)
    resumed.restore(load_checkpoint(tmp_path).optimizer_state, "ckpt")
    np.testing.assert_array_equal(resumed.c, server.c)
    np.testing.assert_array_equal(resumed.published, server.published)
    assert list(resumed.control_checks.norms) == pytest.approx(list(server.control_checks.norms))
    server.discard()
    assert server.round_sum.count == 0


def test_scaffold_learns_on_digits_dirichlet_0_1_over_the_in_memory_bus(tmp_path: Path) -> None:
    out = run_demo(DemoSettings(devices=10, per_round=5, rounds=12, task="digits-mlp", data="digits", seed=0,
                                partition_scheme="dirichlet", alpha=0.1, deadline_s=300.0, broker="memory",
                                devices_in="threads", publish_onnx=False, train_plan={"algorithm": "scaffold"},
                                scheduling=Scheduling(over_selection=1.0, min_devices=10, min_updates=5),
                                out=tmp_path, write_files=False), console=Console(file=io.StringIO()))
    assert out["rounds_failed"] == 0
    acc = out["accuracy_per_round"]
    assert max(acc[-4:]) > acc[0] + 0.25, acc
    ckpt = load_checkpoint(tmp_path / "coordinator-state")
    assert ckpt is not None and np.abs(ckpt.optimizer_state[C_SERVER]).sum() > 0


def test_through_mosquitto_devices_catch_up_on_c_and_a_coordinator_restart_keeps_it(mosquitto, tmp_path) -> None:
    fed = f"sc-{secrets.token_hex(3)}"
    fleet = device_threads(tmp_path, mosquitto.url, mosquitto.protocol, fed, 4)
    for i in range(4):
        fleet.start(i)
    try:
        def config(rounds: int):
            cfg = coordinator_config(mosquitto.url, mosquitto.protocol, tmp_path / "coord", fed, rounds=rounds,
                                     per_round=2, min_devices=4)
            return cfg.model_copy(update={"plan": replace(cfg.plan, algorithm="scaffold")})

        first = Coordinator(config(3))
        result = first.run()
        assert first.scaffold is not None and np.abs(first.scaffold.c).sum() > 0
        kept = first.scaffold.c.copy()
        second = Coordinator(config(6))
        seen: list[np.ndarray] = []

        def on(p: Progress) -> None:
            if p.kind == "round_open" and not seen:
                assert second.scaffold is not None
                seen.append(second.scaffold.c.copy())

        result = second.run(on)
        assert [r.state for r in result.records] == ["closed"] * 3 and result.version == 6
        np.testing.assert_array_equal(seen[0], kept)  # resumed from the checkpoint, not zero
        assert second.scaffold is not None
        # What a device fetches through the control chain is the published c, bit for bit.
        agent = fleet.agents["dev0"]
        got = fetch_control(agent.link, fed, agent.spec, 6, None, 20.0)
        assert params_sha256(got) == params_sha256(second.scaffold.published)
        assert all(a.counters["bad_models"] == 0 for a in fleet.agents.values())
        trained = [a for a in fleet.agents.values() if a.trainer.scaffold.committed()[0].any()]
        assert len(trained) >= 3  # devices hold their own control variates
    finally:
        fleet.stop_all()
