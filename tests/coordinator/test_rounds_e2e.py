"""End to end over a real mosquitto with device processes speaking the real protocol.

Devices are tests/coordinator/sim_device.py processes (real transport, codec and
envelope; updates are a pure function of device and round so expected models can be
computed here).
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
from coordinator.config import config_from_dict
from coordinator.service import Coordinator
from coordinator.state import StateDB, load_checkpoint
from fedmq.codecs import CodecSpec, decode, encode
from fedmq.model.params import flatten_params
from fedmq.tasks import get_task

SIM = Path(__file__).with_name("sim_device.py")
TASK = "digits-logreg"
ROOT = Path(__file__).resolve().parents[2]


def start_devices(broker, fed: str, specs: list[tuple[str, str, int]]) -> list[subprocess.Popen]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return [subprocess.Popen([sys.executable, str(SIM), broker.url, broker.protocol, fed, name, mode, TASK,
                              str(samples)], env=env, stdout=subprocess.DEVNULL)
            for name, mode, samples in specs]


def stop_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait(timeout=10)


def config(broker, tmp_path: Path, fed: str, **round_opts):
    round_cfg = {"devices_per_round": 3, "min_updates": 1, "deadline_s": 5.0, "wait_for_devices_s": 60.0}
    round_cfg.update(round_opts.pop("round", {}))
    data = {"federation": fed, "task": TASK, "rounds": 2, "seed": 3, "state_dir": str(tmp_path / f"state-{fed}"),
            "broker": {"url": broker.url, "protocol": broker.protocol}, "round": round_cfg,
            "plan": {"density": 0.1, "dense_below": 16}, "publish": {"onnx": False},
            # Dense downlink, no density warm-up, FedAvg: these tests compute the expected global
            # model exactly, as the weighted mean of the decoded updates.
            "downlink": {"codec": "none"}, "warmup": {"rounds": 0}, "server_optimizer": {"name": "fedavg"}}
    data.update(round_opts)
    return config_from_dict(data)


def sim_update(device: str, round_: int, size: int) -> np.ndarray:
    rng = np.random.default_rng([zlib.crc32(device.encode()), round_])
    return (0.01 * rng.normal(size=size)).astype(np.float32)


def test_partial_participation_over_rounds(mosquitto, tmp_path):
    fed = "partial"
    devices = start_devices(mosquitto, fed, [(f"good-{i}", "good", 50 + i) for i in range(5)])
    try:
        cfg = config(mosquitto, tmp_path, fed, rounds=3, evaluation={"data": "digits"},
                     round={"devices_per_round": 2, "min_updates": 2, "over_selection": 1.5, "min_devices": 5})
        result = Coordinator(cfg).run()
    finally:
        stop_all(devices)
    assert [r.round for r in result.records] == [1, 2, 3]
    for rec in result.records:
        assert rec.state == "closed" and rec.participants == 3 and rec.accepted == 2
        assert rec.test_accuracy is not None and 0.0 <= rec.test_accuracy <= 1.0
        # bytes_down is what the devices' links counted and reported with their updates; these
        # test devices report none.
        assert rec.bytes_up > 0 and rec.bytes_down >= 0 and rec.dense_bytes_up >= 2 * 4 * 650
        assert rec.device_metrics["train_loss"] > 1.0
    assert result.version == 3
    db = StateDB(cfg.state_dir)
    try:
        assert [r["round"] for r in db.rounds()] == [1, 2, 3]
        devs = db.devices()
        assert len(devs) == 5 and sum(d.rounds for d in devs) == 6
    finally:
        db.close()


def test_silent_device_round_closes_at_deadline(mosquitto, tmp_path):
    fed = "silent"
    devices = start_devices(mosquitto, fed, [("good-0", "good", 40), ("mute-0", "silent", 40)])
    try:
        cfg = config(mosquitto, tmp_path, fed, rounds=1, publish={"onnx": True},
                     round={"devices_per_round": 2, "min_updates": 1, "over_selection": 1.0, "deadline_s": 2.0,
                            "min_devices": 2})
        result = Coordinator(cfg).run()
    finally:
        stop_all(devices)
    (rec,) = result.records
    assert rec.state == "closed" and rec.accepted == 1 and rec.participants == 2
    status = {p.device: p.status for p in rec.participations}
    assert status == {"good-0": "accepted", "mute-0": "no_answer"}
    # The new global model and its ONNX export are retained on the broker, for late joiners.
    from fedmq.model.modelio import OnnxPredictor, model_from_safetensors
    from fedmq.transport.flows import fetch_model
    from fedmq.transport.link import MqttLink
    with MqttLink(cfg.broker, client_id="checker") as link:
        pointer, blob = fetch_model(link, fed, timeout=20)
        onnx_pointer, onnx_blob = fetch_model(link, fed, kind="onnx", timeout=20)
    assert pointer.version == onnx_pointer.version == 1 and onnx_pointer.format == "onnx"
    fetched = get_task(TASK).build_model(0)
    model_from_safetensors(blob.data, fetched)
    np.testing.assert_array_equal(flatten_params(fetched), result.vector)
    x = np.random.default_rng(1).random((3, 64), dtype=np.float32)
    np.testing.assert_allclose(OnnxPredictor(onnx_blob.data).logits(x),
                               result.model(__import__("torch").from_numpy(x)).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_garbage_is_rejected_counted_and_leaves_the_model_alone(mosquitto, tmp_path):
    fed = "garbage"
    specs = [("good-0", "good", 30), ("good-1", "good", 90), ("junk-0", "garbage", 10), ("nan-0", "nan", 10),
             ("liar-0", "impostor", 10)]
    devices = start_devices(mosquitto, fed, specs)
    try:
        cfg = config(mosquitto, tmp_path, fed, rounds=1,
                     round={"devices_per_round": 5, "min_updates": 2, "over_selection": 1.0, "deadline_s": 4.0,
                            "min_devices": 5})
        coord = Coordinator(cfg)
        start = flatten_params(get_task(TASK).build_model(cfg.seed))
        result = coord.run()
    finally:
        stop_all(devices)
    (rec,) = result.records
    assert rec.accepted == 2
    assert rec.rejected == {"device_mismatch": 1, "malformed": 1, "non_finite": 1}
    spec = coord.spec
    codec = cfg.plan.codec
    deltas = [decode(codec.name, encode(sim_update(d, 1, spec.size), spec, codec), spec).astype(np.float64)
              for d in ("good-0", "good-1")]
    want = start + ((30 * deltas[0] + 90 * deltas[1]) / 120).astype(np.float32)
    np.testing.assert_allclose(result.vector, want, rtol=0, atol=1e-7)


def test_one_device_cannot_wreck_the_fleet(mosquitto, tmp_path):
    # A claimed sample count of 2**63 - 1 and a finite update of norm ~1e38, both from a
    # device's own credentials: rejected (over_weighted, and the default norm bound during
    # its warm-up), counted in the database; the model is the mean of the honest two.
    fed = "poison"
    specs = [("good-0", "good", 30), ("good-1", "good", 90), ("huge-0", "huge", 10), ("fat-0", "overweight", 10)]
    devices = start_devices(mosquitto, fed, specs)
    try:
        cfg = config(mosquitto, tmp_path, fed, rounds=1,
                     round={"devices_per_round": 4, "min_updates": 2, "over_selection": 1.0, "deadline_s": 20.0,
                            "min_devices": 4, "wait_for_devices_s": 240.0})
        coord = Coordinator(cfg)
        start = flatten_params(get_task(TASK).build_model(cfg.seed))
        result = coord.run()
    finally:
        stop_all(devices)
    (rec,) = result.records
    assert rec.accepted == 2 and rec.rejected == {"norm_bound": 1, "over_weighted": 1}
    spec = coord.spec
    codec = cfg.plan.codec
    deltas = [decode(codec.name, encode(sim_update(d, 1, spec.size), spec, codec), spec).astype(np.float64)
              for d in ("good-0", "good-1")]
    want = start + ((30 * deltas[0] + 90 * deltas[1]) / 120).astype(np.float32)
    np.testing.assert_allclose(result.vector, want, rtol=0, atol=1e-7)
    db = StateDB(cfg.state_dir)
    try:
        assert db.rejections() == {"norm_bound": 1, "over_weighted": 1}
    finally:
        db.close()


def _toml(broker, state: Path, fed: str, rounds: int) -> str:
    return f"""
federation = "{fed}"
task = "{TASK}"
rounds = {rounds}
seed = 5
state_dir = "{state}"
[broker]
url = "{broker.url}"
protocol = "{broker.protocol}"
[round]
devices_per_round = 3
min_updates = 3
over_selection = 1.0
deadline_s = 20.0
min_devices = 3
[plan]
density = 0.1
dense_below = 16
[server_optimizer]
name = "fedadam"
eta = 0.01
[publish]
onnx = false
[warmup]
rounds = 0
"""


def test_kill_minus_9_mid_round_then_resume(mosquitto, tmp_path, coordinator_cli):
    """Resume is bit-identical from the checkpoint; the rerun round sees the same selection
    and (deterministic devices) the same updates, so the final model equals an uninterrupted
    run up to float64 summation order of the accumulator."""
    names = [(f"dev-{i}", "good", 20 + 10 * i) for i in range(3)]
    cfg_path = tmp_path / "killed.toml"
    cfg_path.write_text(_toml(mosquitto, tmp_path / "killed", "killed", 4))
    devices = start_devices(mosquitto, "killed", names)
    try:
        proc = coordinator_cli(cfg_path)
        for line in proc.stdout:  # wait for round 2 to close, then kill while round 3 is in flight
            if line.startswith("event=round_open round=3"):
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        before = load_checkpoint(tmp_path / "killed")
        assert before.round == 2
        proc = coordinator_cli(cfg_path)
        out, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, out
        assert "event=round_closed round=3" in out and "event=round_closed round=1" not in out
    finally:
        stop_all(devices)
    after = load_checkpoint(tmp_path / "killed")
    assert after.round == 4 and after.version == 4

    ref_cfg = tmp_path / "ref.toml"
    ref_cfg.write_text(_toml(mosquitto, tmp_path / "ref", "ref", 4))
    devices = start_devices(mosquitto, "ref", names)
    try:
        proc = coordinator_cli(ref_cfg)
        out, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, out
    finally:
        stop_all(devices)
    ref = load_checkpoint(tmp_path / "ref")
    np.testing.assert_allclose(after.model, ref.model, rtol=0, atol=1e-6)
    for key in ref.optimizer_state:
        np.testing.assert_allclose(after.optimizer_state[key], ref.optimizer_state[key], rtol=1e-6, atol=1e-9)
    db = StateDB(tmp_path / "killed")
    try:
        assert [r["round"] for r in db.rounds()] == [1, 2, 3, 4]
        assert all(r["accepted"] == 3 for r in db.rounds())
    finally:
        db.close()


def test_cli_status_and_export_after_a_run(mosquitto, tmp_path):
    from typer.testing import CliRunner

    from coordinator.cli import app
    from fedmq.model.modelio import OnnxPredictor

    fed = "clifed"
    devices = start_devices(mosquitto, fed, [("good-0", "good", 40)])
    try:
        cfg = config(mosquitto, tmp_path, fed, rounds=1,
                     round={"devices_per_round": 1, "min_updates": 1, "over_selection": 1.0, "min_devices": 1})
        result = Coordinator(cfg).run()
    finally:
        stop_all(devices)
    cfg_path = tmp_path / "c.toml"
    cfg_path.write_text(f'federation = "{fed}"\ntask = "{TASK}"\nseed = 3\nstate_dir = "{cfg.state_dir}"\n')
    runner = CliRunner()
    out = runner.invoke(app, ["status", "-c", str(cfg_path)])
    assert out.exit_code == 0, out.output
    assert "good-0" in out.output and "last finished round 1" in out.output
    onnx_path = tmp_path / "model.onnx"
    out = runner.invoke(app, ["export", "-c", str(cfg_path), "--format", "onnx", "--out", str(onnx_path)])
    assert out.exit_code == 0, out.output
    x = np.random.default_rng(0).random((4, 64), dtype=np.float32)
    model = result.model
    import torch
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(OnnxPredictor(onnx_path).logits(x), want, rtol=1e-4, atol=1e-5)
    out = runner.invoke(app, ["export", "-c", str(cfg_path), "--format", "pickle", "--out", str(onnx_path)])
    assert out.exit_code == 2 and "onnx or safetensors" in out.output


def test_sigterm_mid_round_keeps_the_checkpoint_and_exits_0(mosquitto, tmp_path, coordinator_cli):
    names = [(f"dev-{i}", "good", 20) for i in range(3)]
    cfg_path = tmp_path / "term.toml"
    cfg_path.write_text(_toml(mosquitto, tmp_path / "term", "term", 4))
    devices = start_devices(mosquitto, "term", names)
    try:
        proc = coordinator_cli(cfg_path)
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("event=round_open round=2"):
                break
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        stop_all(devices)
    assert proc.returncode == 0, "".join(lines) + out
    assert "stopped=true" in out
    # Round 1 was checkpointed; round 2 is either checkpointed too (if it closed before
    # the signal was seen) or rerun by the next start. The run did not go on to round 4.
    assert load_checkpoint(tmp_path / "term").round in (1, 2)


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _run_in_thread(coord: Coordinator) -> tuple[threading.Thread, queue.SimpleQueue, dict]:
    events: queue.SimpleQueue = queue.SimpleQueue()
    out: dict = {}
    thread = threading.Thread(target=lambda: out.setdefault("result", coord.run(progress_callback=events.put)),
                              daemon=True)
    thread.start()
    return thread, events, out


def test_no_devices_waits_without_burning_rounds_until_one_comes(mosquitto, tmp_path):
    fed = "empty"
    # wait_for_devices_s is short: with 0 eligible the coordinator used to open (and fail) a round after it.
    cfg = config(mosquitto, tmp_path, fed, rounds=1, round={"devices_per_round": 1, "wait_for_devices_s": 0.5})
    lines = _Lines()
    logger = logging.getLogger("fedmq.coordinator")
    logger.addHandler(lines)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    devices: list[subprocess.Popen] = []
    coord = Coordinator(cfg)
    try:
        thread, events, out = _run_in_thread(coord)
        first = None
        # Watch the coordinator wait well past wait_for_devices_s: only "waiting" events, no round.
        while first is None or time.monotonic() - first < 3.0:
            event = events.get(timeout=30)
            assert event.kind == "waiting", event
            first = first or time.monotonic()
        db = StateDB(cfg.state_dir)
        try:
            assert db.rounds() == []
        finally:
            db.close()
        assert "waiting for devices: 0 eligible (0 online), 1 needed for round 1" in lines.lines
        devices = start_devices(mosquitto, fed, [("late-0", "good", 50)])
        thread.join(timeout=60)
        assert not thread.is_alive()
    finally:
        coord.stop()
        stop_all(devices)
        logger.removeHandler(lines)
        logger.setLevel(old_level)
    result = out["result"]
    assert [(r.round, r.state, r.accepted) for r in result.records] == [(1, "closed", 1)]
    assert not result.stopped and result.version == 1


def test_a_stop_request_ends_the_wait_for_devices_promptly(mosquitto, tmp_path):
    coord = Coordinator(config(mosquitto, tmp_path, "stopwait", rounds=1))
    thread, events, out = _run_in_thread(coord)
    try:
        assert events.get(timeout=30).kind == "waiting"
        stopped_at = time.monotonic()
        coord.stop()
        thread.join(timeout=10)
        assert not thread.is_alive()
    finally:
        coord.stop()
    assert time.monotonic() - stopped_at < 3.0
    assert out["result"].stopped and out["result"].records == []
