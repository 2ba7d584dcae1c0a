"""The simulator is the product: the same seeded federation gives the same accuracy curve on the
in-memory bus (agents as threads) and through mosquitto (one process per device); and each seam
(codec, aggregation rule, link) takes a new implementation as one module plus a registry line."""

from __future__ import annotations

import importlib.util
import io
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console
from safetensors.numpy import load_file

from fleet.demo import DemoSettings, Scheduling, run_demo

PLUGINS = Path(__file__).parent / "plugins"

#: Deterministic scheduling: every device online before round 1, no over-selection, every
#: selected device awaited, deadlines that never fire.
EXACT = Scheduling(over_selection=1.0, min_devices=3, holdout_fraction=0.1, min_updates=2)


def _plugin(name: str) -> Any:
    """Import tests/fleet/plugins/NAME.py once (its registry line runs on import)."""
    key = f"fedmq_test_plugin_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, PLUGINS / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


def _run(tmp: Path, **kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = dict(devices=3, per_round=2, rounds=3, task="digits-mlp", data="digits", seed=0,
                                deadline_s=300.0, scheduling=EXACT, train_plan={"local_epochs": 1},
                                publish_onnx=False, out=tmp)
    args.update(kw)
    return run_demo(DemoSettings(**args), console=Console(file=io.StringIO()))


def _model(folder: Path) -> dict[str, np.ndarray]:
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.slow
def test_memory_bus_and_mosquitto_processes_give_the_same_curve(tmp_path: Path, mosquitto) -> None:
    memory = _run(tmp_path / "memory", broker="memory", devices_in="threads")
    real = _run(tmp_path / "mosquitto", broker=mosquitto.url, protocol=mosquitto.protocol, devices_in="processes")

    assert memory["rounds_failed"] == real["rounds_failed"] == 0
    assert memory["accuracy_per_round"] == real["accuracy_per_round"]
    assert [r["test_loss"] for r in memory["records"]] == pytest.approx([r["test_loss"] for r in real["records"]],
                                                                         rel=1e-6)
    for rec_m, rec_r in zip(memory["records"], real["records"]):
        assert [p["device"] for p in rec_m["participations"]] == [p["device"] for p in rec_r["participations"]]
        assert rec_m["bytes_up"] == rec_r["bytes_up"]
    a, b = _model(tmp_path / "memory"), _model(tmp_path / "mosquitto")
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=0, atol=1e-6)
    # The curve is a learning curve, not a constant.
    assert memory["final_accuracy"] > memory["initial_accuracy"] + 0.1


def test_a_new_codec_is_one_module_and_a_registry_line(tmp_path: Path) -> None:
    _plugin("float16_codec")
    out = _run(tmp_path, broker="memory", devices_in="threads", codec="test-float16", rounds=2,
               train_plan={"local_epochs": 1, "error_feedback": False})
    # Half precision: 2 bytes a parameter, every accepted update the coordinator received.
    params = 85_002
    assert out["rounds_failed"] == 0 and out["updates_accepted"] == 4
    assert out["bytes_up_dense_equivalent"] == 4 * params * 4
    assert 2 * params * 4 < out["bytes_up_total"] < 2.05 * params * 4
    assert out["final_accuracy"] > out["initial_accuracy"]


def test_a_new_aggregation_rule_is_one_module_and_a_registry_line(tmp_path: Path) -> None:
    from coordinator.config import config_from_dict
    from fedmq.errors import ConfigError

    _plugin("unweighted_mean")
    base = {"federation": "f", "task": "digits-mlp"}
    assert config_from_dict({**base, "aggregation": {"rule": "test-unweighted-mean"}}).aggregation.rule \
        == "test-unweighted-mean"
    with pytest.raises(ConfigError, match="unknown aggregation rule"):
        config_from_dict({**base, "aggregation": {"rule": "no-such-rule"}})

    # The same federation aggregated by both rules: devices hold unequal amounts of data
    # (Dirichlet), so a sample-weighted and an unweighted mean give different global models.
    weighted = _run(tmp_path / "w", broker="memory", devices_in="threads", partition_scheme="dirichlet",
                    rounds=1, aggregation="weighted-mean")
    unweighted = _run(tmp_path / "u", broker="memory", devices_in="threads", partition_scheme="dirichlet",
                      rounds=1, aggregation="test-unweighted-mean")
    a, b = _model(tmp_path / "w"), _model(tmp_path / "u")
    assert weighted["updates_accepted"] == unweighted["updates_accepted"] == 2
    assert any(not np.allclose(a[k], b[k], atol=1e-7) for k in a)


def test_a_new_link_is_one_module_and_a_registry_line(tmp_path: Path) -> None:
    plugin = _plugin("counting_link")
    plugin.PUBLISHES.clear()
    out = _run(tmp_path, broker="counting://t1", devices_in="threads", rounds=1)
    assert out["rounds_failed"] == 0 and out["updates_accepted"] == 2
    # Coordinator and every device published through the new link.
    assert plugin.PUBLISHES["fedmq-coordinator-demo"] > 0
    assert {d for d in plugin.PUBLISHES if d.startswith("device-")} == {"device-00", "device-01", "device-02"}


def test_the_demo_runs_buffered_asynchronous_aggregation(tmp_path: Path) -> None:
    import tomllib

    from fedmq.errors import ConfigError

    out = _run(tmp_path, broker="memory", devices_in="threads", round_mode="async", rounds=3)
    cfg = tomllib.loads((tmp_path / "coordinator.toml").read_text())
    assert cfg["round"]["mode"] == "async" and cfg["async"]["buffer_size"] == 2
    # K = --per-round updates per server step; the buffered engine records their staleness.
    assert out["rounds_failed"] == 0 and out["updates_accepted"] == 3 * 2
    assert all(r["accepted"] == 2 and "staleness" in r["device_metrics"] for r in out["records"])
    assert 0 < out["bytes_down_total"] < out["bytes_down_dense_equivalent"]  # the compressed downlink
    assert out["final_accuracy"] > out["initial_accuracy"]
    with pytest.raises(ConfigError, match="--mode"):
        _run(tmp_path / "bad", broker="memory", devices_in="threads", round_mode="later")
