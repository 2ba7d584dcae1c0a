"""Differential privacy in the coordinator: the clip norm as the norm bound, the noisy sum,
the charge, the budget, and epsilon wherever accuracy is shown."""

from __future__ import annotations

import json
import math
from pathlib import Path

import dp_accounting
import numpy as np
import onnx
import pytest
from dp_accounting import rdp
from typer.testing import CliRunner

from coordinator.cli import app
from coordinator.config import config_from_dict
from coordinator.metrics import CoordinatorMetrics
from coordinator.privacy import PrivacyChecks, PrivacyGuard
from coordinator.report import load_run, render_html
from coordinator.status import build_status, render_text
from fedmq.codecs import CodecSpec, encode
from fedmq.wire.envelope import ClientUpdate, encode_update
from fedmq.errors import ConfigError
from fedmq.fl.rounds import Accepted, Rejected, RoundEngine
from fedmq.model.params import ParamSpec
from fleet.demo import DemoSettings, demo_privacy, run_demo

SPEC = ParamSpec(("w", "b"), ((30, 40), (40,)), ("float32", "float32"))
DEVICES = [f"d{i}" for i in range(10)]


def _config(**privacy: object):
    return config_from_dict({"federation": "f", "task": "digits-mlp", "rounds": 10,
                             "round": {"devices_per_round": 4, "min_updates": 1},
                             "privacy": {"enabled": True, **privacy}})


def _update(device: str, vector: np.ndarray, codec: str = "none", metrics: dict[str, float] | None = None) -> bytes:
    payload = encode(vector.astype(np.float32), SPEC, CodecSpec.from_table(codec, {"density": 0.1}))
    return encode_update(ClientUpdate(federation="f", device=device, round=1, base_version=0, samples=50,
                                      kind="delta", spec_hash=SPEC.hash, codec=codec, payload=payload,
                                      metrics=metrics if metrics is not None else {"dp_unclipped": 1.0}))


def _engine(guard: PrivacyGuard) -> RoundEngine:
    engine = RoundEngine("f", SPEC, kind="delta", is_known=lambda d: True, max_update_bytes=1 << 22,
                         aggregator=guard.aggregator, checks=PrivacyChecks(guard))
    selected, target = guard.select(DEVICES, 1)
    engine.open(1, 0, selected, target, deadline=100.0, started=0.0)
    return engine


def test_an_update_above_the_clip_norm_is_rejected_and_counted_and_the_mean_has_a_fixed_denominator() -> None:
    guard = PrivacyGuard(_config(clip_norm=2.0, noise_multiplier=1e-9, sampling="without-replacement"), SPEC)
    engine = _engine(guard)
    a, b, c = engine.selection[:3]
    unit = np.zeros(SPEC.size, np.float32)
    unit[0] = 1.5
    assert isinstance(engine.offer(a, "t1", _update(a, unit)), Accepted)
    unit2 = np.zeros(SPEC.size, np.float32)
    unit2[1] = 1.0
    assert isinstance(engine.offer(b, "t2", _update(b, unit2)), Accepted)
    too_long = np.full(SPEC.size, 0.1, np.float32)   # norm 3.5 > C = 2: a device that did not clip
    out = engine.offer(c, "t3", _update(c, too_long))
    assert isinstance(out, Rejected) and out.reason == "norm_bound"
    assert engine.rejected == {"norm_bound": 1}
    closed = engine.close(1.0)
    # Uniform weights, denominator 4 (the expected participants), not 2 (those accepted).
    assert closed.model_delta[0] == pytest.approx(1.5 / 4, abs=1e-6)
    assert closed.model_delta[1] == pytest.approx(1.0 / 4, abs=1e-6)


def test_adaptive_clipping_needs_a_valid_bit_and_moves_the_clip_norm() -> None:
    guard = PrivacyGuard(_config(clip_norm=1.0, noise_multiplier=1.0, adaptive_clipping=True, count_stddev=0.6,
                                 sampling="without-replacement", population=10), SPEC)
    engine = _engine(guard)
    a, b = engine.selection[:2]
    small = np.full(SPEC.size, 1e-3, np.float32)
    bad = engine.offer(a, "t1", _update(a, small, metrics={"dp_unclipped": 0.5}))
    assert isinstance(bad, Rejected) and bad.reason == "malformed"
    assert isinstance(engine.offer(b, "t2", _update(b, small, metrics={"dp_unclipped": 1.0})), Accepted)
    engine.close(1.0)
    before = guard.clip_norm
    guard.charge(1, 1)
    assert guard.clip_norm != before and math.isfinite(guard.clip_norm)
    with pytest.raises(ConfigError, match="count_stddev"):
        PrivacyGuard(_config(noise_multiplier=2.0, adaptive_clipping=True, count_stddev=0.5), SPEC)


def test_the_charge_equals_an_independent_computation_and_distributed_noise_charges_the_survivors() -> None:
    guard = PrivacyGuard(_config(noise_multiplier=1.2, sampling="without-replacement"), SPEC)
    guard.select(DEVICES, 1)
    eps = guard.charge(1, 4)
    acc = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    acc.compose(dp_accounting.SampledWithoutReplacementDpEvent(10, 4, dp_accounting.GaussianDpEvent(0.6)))
    assert eps == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)

    dist = PrivacyGuard(config_from_dict({
        "federation": "f", "task": "digits-mlp", "round": {"devices_per_round": 4},
        "plan": {"codec": "none", "error_feedback": False},
        "privacy": {"enabled": True, "noise": "distributed", "noise_multiplier": 1.2, "sampling_rate": 0.4}}), SPEC)
    dist.select(DEVICES, 1)
    plan = dist.plan(config_from_dict({"federation": "f", "task": "t", "plan": {"codec": "none"}}).plan)
    assert plan.noise_std == pytest.approx(1.2 * 1.0 / math.sqrt(0.4 * 10))
    eps = dist.charge(1, 1)   # one survivor of four expected: a quarter of the noise variance
    acc = rdp.RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(0.4, dp_accounting.GaussianDpEvent(1.2 * math.sqrt(1 / 4))))
    assert eps == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)


def test_configurations_that_privacy_cannot_account_are_refused() -> None:
    with pytest.raises(ConfigError, match="FedBuff"):
        config_from_dict({"federation": "f", "task": "t", "round": {"mode": "async"},
                          "privacy": {"enabled": True, "noise_multiplier": 1.0}})
    with pytest.raises(ConfigError, match="codec"):
        config_from_dict({"federation": "f", "task": "t",
                          "privacy": {"enabled": True, "noise_multiplier": 1.0, "noise": "distributed"}})
    with pytest.raises(ConfigError, match="target_epsilon"):
        config_from_dict({"federation": "f", "task": "t", "privacy": {"enabled": True}})
    with pytest.raises(ConfigError, match="sampling_rate"):
        PrivacyGuard(_config(target_epsilon=3.0), SPEC)


def test_a_round_past_the_budget_is_not_opened_and_epsilon_is_everywhere(tmp_path: Path) -> None:
    devices, per_round = 4, 2
    table = demo_privacy(devices, per_round, 6, 0.0, 1.0, 1.0, 1e-5, False, "central")
    acc = rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(per_round / devices, dp_accounting.GaussianDpEvent(1.0))
    acc.compose(event, 2)
    two = acc.get_epsilon(1e-5)
    acc.compose(event)
    table["target_epsilon"] = (two + acc.get_epsilon(1e-5)) / 2   # room for two charged rounds, not three
    metrics = CoordinatorMetrics()
    summary = run_demo(DemoSettings(
        devices=devices, per_round=per_round, rounds=6, broker="memory", devices_in="threads", out=tmp_path / "run",
        write_files=False, publish_onnx=False, privacy=table, samples_per_device=40, test_samples=200, deadline_s=30.0),
        metrics=metrics)
    # Under DP the demo, like the coordinator, keeps the uplink compressed and the downlink dense.
    assert (summary["codec"], summary["downlink_codec"]) == ("topk-int8", "none")
    dp = summary["privacy"]
    assert dp["rounds_charged"] == 2 and dp["budget_exhausted"] and "budget" in dp["budget_exhausted"]
    assert dp["epsilon"] == pytest.approx(two, rel=1e-9) and dp["epsilon"] <= table["target_epsilon"]
    assert summary["rounds"] < 6
    charged = [r for r in summary["records"] if r["state"] == "closed"]
    assert charged[-1]["epsilon"] == pytest.approx(two, rel=1e-9)
    assert metrics.privacy_epsilon._value.get() == pytest.approx(two, rel=1e-9)

    run = tmp_path / "run"
    rows = (run / "rounds.csv").read_text().splitlines()
    assert "epsilon" in rows[0].split(",")
    status = build_status(run / "coordinator-state", 0.0, delta=1e-5)
    assert status["rounds_summary"]["epsilon"] == pytest.approx(two, rel=1e-9)
    assert f"differential privacy: epsilon {two:.4g} spent at delta 1e-05" in render_text(status, 0.0)
    # The operator sees that the run stopped for the budget, and which round it did not open.
    stop = status["stopped"]
    assert stop is not None and stop["round_not_opened"] == summary["rounds"] + 1
    assert stop["reason"] == dp["budget_exhausted"]
    assert f"round {stop['round_not_opened']} was not opened: {dp['budget_exhausted']}" in render_text(status, 0.0)
    assert 'data-key="epsilon"' in render_html(load_run(run))
    assert json.loads((run / "summary.json").read_text())["privacy"]["epsilon"] == pytest.approx(two, rel=1e-9)
    out = tmp_path / "model.onnx"
    result = CliRunner().invoke(app, ["export", "-c", str(run / "coordinator.toml"), "--format", "onnx",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert float(props["dp_epsilon"]) == pytest.approx(two, rel=1e-5) and props["dp_delta"] == "1e-05"


def test_distributed_noise_federation_charges_the_noise_of_the_survivors(tmp_path: Path) -> None:
    from coordinator.state import load_checkpoint

    table = demo_privacy(4, 2, 3, 0.0, 1.5, 5.0, 1e-5, False, "distributed")
    summary = run_demo(DemoSettings(
        devices=4, per_round=2, rounds=3, broker="memory", devices_in="threads", codec="none", out=tmp_path / "run",
        write_files=False, publish_onnx=False, privacy=table, samples_per_device=40, test_samples=200, deadline_s=30.0))
    # Real agents clipped and added their share: nothing was above the clip norm's allowance.
    assert summary["updates_rejected"] == 0 and summary["updates_accepted"] > 0
    ledger = json.loads(load_checkpoint(tmp_path / "run" / "coordinator-state").meta["privacy"])["ledger"]
    closed = {r["round"]: r["accepted"] for r in summary["records"] if r["state"] == "closed"}
    assert [c["round"] for c in ledger] == sorted(closed)
    for charge in ledger:
        m = charge["rate"] * charge["population"]
        assert charge["sigma"] == pytest.approx(1.5 * math.sqrt(closed[charge["round"]] / m), rel=1e-9)


def test_privacy_defaults_to_a_dense_downlink_and_warns_about_a_compressed_one(
        caplog: pytest.LogCaptureFixture) -> None:
    """Measured: the MNIST CNN at epsilon 8 learned to 26.1% with the compressed downlink and
    87.35% with a dense one (BENCHMARKS.md, "Privacy"): under DP the downlink is dense unless
    [downlink] names a codec; a named compressed one is kept and warned about at start."""
    base = {"federation": "f", "task": "digits-mlp", "rounds": 10}
    private = {"privacy": {"enabled": True, "noise_multiplier": 1.0}}
    assert config_from_dict(base).downlink.codec.name == "topk-int8"
    assert config_from_dict({**base, "privacy": {"enabled": False}}).downlink.codec.name == "topk-int8"
    dp = config_from_dict({**base, **private})
    assert dp.downlink.codec.name == "none"
    # Other [downlink] options stay; a codec parameter or a codec named keeps the codec.
    windowed = config_from_dict({**base, **private, "downlink": {"window": 5, "snapshot_every": 5}})
    assert (windowed.downlink.codec.name, windowed.downlink.window) == ("none", 5)
    by_density = config_from_dict({**base, **private, "downlink": {"density": 0.05}})
    assert by_density.downlink.codec.name == "topk-int8" and by_density.downlink.codec.params.density == 0.05
    named = config_from_dict({**base, **private, "downlink": {"codec": "topk-int8"}})
    assert named.downlink.codec.name == "topk-int8"
    # An invalid [privacy] is reported by its own validation, not hidden by the default.
    with pytest.raises(ConfigError, match="privacy"):
        config_from_dict({**base, "privacy": {"enabled": True, "noise_multiplier": 1.0, "bogus": 1}})
    with caplog.at_level("WARNING", logger="fedmq.coordinator.privacy"):
        PrivacyGuard(dp, SPEC)
    assert not any("compressed downlink" in r.getMessage() for r in caplog.records)
    with caplog.at_level("WARNING", logger="fedmq.coordinator.privacy"):
        PrivacyGuard(named, SPEC)
    assert any("compressed downlink" in r.getMessage() for r in caplog.records)
