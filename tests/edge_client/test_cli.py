"""`fedmq edge` / `python -m edge_client`: clean errors, ONNX prediction parity, local status."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from typer.testing import CliRunner

from broker.launch import free_port
from edge_client.cli import app
from fedmq.data import load_digits, save_npz_atomic
from fedmq.wire.messages import ModelPointer
from fedmq.model.modelio import export_onnx
from fedmq.model.params import ParamSpec
from fedmq.tasks import get_task
from fedmq.transport.flows import publish_model
from fedmq.transport.link import MqttLink
from fedmq.transport.settings import BrokerSettings

ROOT = Path(__file__).resolve().parents[2]


def _config(tmp_path: Path, broker_url: str = "mqtt://127.0.0.1:1", **options: object) -> Path:
    values = {"device_id": "dev-1", "federation": "fed", "task": "digits-mlp", "data": str(tmp_path / "part.npz"),
              "state_dir": str(tmp_path / "state")}
    values.update(options)
    path = tmp_path / "edge.toml"
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())
                    + f"[broker]\nurl = {json.dumps(broker_url)}\n")
    return path


def _run_module(*args: str, **extra_env: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDMQ_EDGE_")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra_env)
    return subprocess.run([sys.executable, "-m", "edge_client", *args], capture_output=True, text=True, env=env,
                          timeout=120, cwd=ROOT)


def test_bad_config_exits_2_naming_the_option(tmp_path):
    result = _run_module("run", "-c", str(_config(tmp_path, torch_threads=0)))
    assert result.returncode == 2
    assert "torch_threads" in result.stderr and "greater than or equal to 1" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_log_level_is_one_line_with_the_accepted_levels(tmp_path):
    result = _run_module("run", "-c", str(_config(tmp_path)), "--log-level", "LOUD")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "fedmq edge run: error: Invalid value for '--log-level': 'LOUD' is not one of 'debug', 'info', 'warning', "
        "'error'. (see fedmq edge run --help)"]


def test_typo_in_an_environment_variable_exits_2_naming_it(tmp_path):
    result = _run_module("run", "-c", str(_config(tmp_path)), FEDMQ_EDGE_DEVICEID="dev-2")
    assert result.returncode == 2
    assert ("environment variable FEDMQ_EDGE_DEVICEID matches no edge client option; did you mean "
            "FEDMQ_EDGE__DEVICE_ID (option 'device_id')?") in result.stderr
    assert "Traceback" not in result.stderr


def test_refused_broker_is_reported_at_once_with_its_cause(tmp_path):
    x, y = load_digits()
    save_npz_atomic(tmp_path / "part.npz", x[:50], y[:50])
    url = f"mqtt://127.0.0.1:{free_port()}"
    result = _run_module("run", "-c", str(_config(tmp_path, broker_url=url)))
    assert result.returncode == 1
    assert f"cannot connect to broker {url} (client 'dev-1'): connection refused" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_data_file_exits_2_naming_the_path(tmp_path):
    result = _run_module("run", "-c", str(_config(tmp_path)))
    assert result.returncode == 2
    assert str(tmp_path / "part.npz") in result.stderr and "not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_corrupt_data_file_exits_2(tmp_path):
    (tmp_path / "part.npz").write_bytes(b"PK\x03\x04 this is not a zip archive")
    result = _run_module("run", "-c", str(_config(tmp_path)))
    assert result.returncode == 2 and str(tmp_path / "part.npz") in result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_broker_exits_1_for_a_restart(tmp_path):
    x, y = load_digits()
    save_npz_atomic(tmp_path / "part.npz", x[:50], y[:50])
    result = _run_module("run", "-c", str(_config(tmp_path)))
    assert result.returncode == 1, result.stderr
    assert "mqtt://127.0.0.1:1" in result.stderr and "Traceback" not in result.stderr


def _model_and_samples(tmp_path: Path):
    task = get_task("digits-mlp")
    model = task.build_model(5)
    x, _ = load_digits()
    samples = x[:25]
    np.save(tmp_path / "x.npy", samples)
    with torch.no_grad():
        expected = model(torch.from_numpy(samples)).numpy()
    return task, model, expected


def test_predict_with_a_model_file_matches_torch(tmp_path):
    task, model, expected = _model_and_samples(tmp_path)
    export_onnx(model, task, tmp_path / "model.onnx")
    result = CliRunner().invoke(app, ["predict", "--input", str(tmp_path / "x.npy"), "--model",
                                      str(tmp_path / "model.onnx"), "--save-logits", str(tmp_path / "logits.npy")])
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), expected, atol=1e-4)
    assert [int(c) for c in result.output.split()] == expected.argmax(axis=1).tolist()


def test_predict_fetches_the_latest_onnx_export_from_the_broker(tmp_path, mosquitto):
    task, model, expected = _model_and_samples(tmp_path)
    onnx_bytes = export_onnx(model, task)
    spec = ParamSpec.from_module(model)
    pointer = ModelPointer(version=4, spec_hash=spec.hash, round=3, size=len(onnx_bytes),
                           sha256=hashlib.sha256(onnx_bytes).hexdigest(), format="onnx")
    with MqttLink(BrokerSettings(url=mosquitto.url, protocol=mosquitto.protocol), client_id="coord") as link:
        publish_model(link, "fed", 4, onnx_bytes, pointer, kind="onnx")
    cfg = _config(tmp_path, broker_url=mosquitto.url)
    result = CliRunner().invoke(app, ["predict", "--input", str(tmp_path / "x.npy"), "-c", str(cfg),
                                      "--save-logits", str(tmp_path / "logits.npy")])
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), expected, atol=1e-4)
    assert [int(c) for c in result.output.split()] == expected.argmax(axis=1).tolist()


def test_predict_bad_input_is_a_clean_error(tmp_path):
    task, model, _ = _model_and_samples(tmp_path)
    export_onnx(model, task, tmp_path / "model.onnx")
    np.save(tmp_path / "bad.npy", np.zeros((3, 5), np.float32))
    result = CliRunner().invoke(app, ["predict", "--input", str(tmp_path / "bad.npy"), "--model",
                                      str(tmp_path / "model.onnx")])
    assert result.exit_code == 2 and "expected (N, 64)" in result.output
    result = CliRunner().invoke(app, ["predict", "--input", str(tmp_path / "absent.npy"), "--model",
                                      str(tmp_path / "model.onnx")])
    assert result.exit_code == 2 and "absent.npy" in result.output


def test_status_shows_the_local_state(tmp_path):
    from edge_client.state import DeviceState

    state = DeviceState(tmp_path / "state")
    state.cache_model(3, b"weights")
    state.finish_round(7)
    result = CliRunner().invoke(app, ["status", "-c", str(_config(tmp_path))])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown["last_round"] == 7 and shown["cached_models"] == [3] and shown["inflight"] is None
