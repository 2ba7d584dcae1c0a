"""A codec owns its settings: the codec spec (name + the codec's own parameters), the plan's
flat table on the wire and in ``[plan]`` / ``[downlink]``, and the schedule both directions share."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from coordinator.config import SCHEMA, config_from_dict
from fedmq.codecs import CodecSpec, NoParams
from fedmq.codecs.schedule import DensityWarmup
from fedmq.codecs.topk_int8 import TopKParams
from fedmq.errors import CodecError, ConfigError, WireError
from fedmq.wire.messages import RoundTask, TrainPlan

BASE = {"federation": "f", "task": "digits-mlp"}


def _task(plan: TrainPlan) -> RoundTask:
    return RoundTask("f", "d", 3, 2, "0" * 16, 1.5, plan)


def test_every_codec_default_is_written_once_in_the_codec_s_module() -> None:
    cfg = config_from_dict(BASE)
    assert cfg.plan.codec == cfg.downlink.codec == CodecSpec() == CodecSpec("topk-int8", TopKParams())
    assert CodecSpec("none").params == NoParams()


def test_the_wire_plan_is_the_old_flat_map_for_the_default_codec() -> None:
    # An older device reads these keys as it always has: same keys, same values.
    plan = msgpack.unpackb(_task(TrainPlan()).to_bytes())["plan"]
    assert plan == {"update_kind": "delta", "local_steps": 0, "local_epochs": 1, "batch_size": 32, "lr": 0.05,
                    "prox_mu": 0.0, "max_seconds": 0.0, "codec": "topk-int8", "density": 0.01, "block_size": 512,
                    "dense_below": 4096, "stochastic": False, "topk": "global", "error_feedback": True, "seed": 0,
                    "clip_norm": 0.0, "noise_std": 0.0}
    # A codec without parameters sends none; a device fills in the codec's defaults for keys left out.
    none = msgpack.unpackb(_task(TrainPlan(codec=CodecSpec("none"))).to_bytes())["plan"]
    assert not {"density", "block_size", "dense_below", "stochastic", "topk"} & set(none)
    raw = msgpack.unpackb(_task(TrainPlan()).to_bytes())
    for key in ("density", "block_size", "dense_below", "stochastic", "topk"):
        del raw["plan"][key]
    raw["plan"]["a_key_of_a_later_version"] = 1  # ignored, as before
    assert RoundTask.from_bytes(msgpack.packb(raw)).plan == TrainPlan()


def test_the_wire_plan_is_strict_about_the_codec_s_parameters() -> None:
    raw = msgpack.unpackb(_task(TrainPlan(codec=CodecSpec.of(density=0.2))).to_bytes())
    assert RoundTask.from_bytes(msgpack.packb(raw)).plan.codec.params.density == 0.2
    for key, value, rule in (("density", "0.2", "R24"), ("block_size", 1.0, "R24"), ("density", 0.0, "R25"),
                             ("codec", "no-such-codec", "R25")):
        bad = {**raw, "plan": {**raw["plan"], key: value}}
        with pytest.raises(WireError, match=rule):
            RoundTask.from_bytes(msgpack.packb(bad))


def test_user_config_keys_still_read_and_become_the_codec_s_params() -> None:
    cfg = config_from_dict({**BASE, "plan": {"density": 0.05, "dense_below": 64, "lr": 0.1},
                            "downlink": {"density": 0.02, "topk": "per-tensor", "window": 5, "snapshot_every": 5}})
    assert cfg.plan.codec == CodecSpec.of(density=0.05, dense_below=64) and cfg.plan.lr == 0.1
    assert cfg.downlink.codec == CodecSpec.of(density=0.02, topk="per-tensor") and cfg.downlink.window == 5
    # Switching codec is one line: the other codec's parameters are left.
    cfg = config_from_dict({**BASE, "plan": {"codec": "none", "density": 0.05},
                            "downlink": {"codec": "none", "density": 0.01}})
    assert cfg.plan.codec == cfg.downlink.codec == CodecSpec("none") and not cfg.downlink.compressed
    for table in ({"plan": {"densty": 0.05}}, {"downlink": {"densty": 0.05}}, {"plan": {"density": 2.0}},
                  {"downlink": {"codec": "gzip"}}):
        with pytest.raises(ConfigError):
            config_from_dict({**BASE, **table})
    assert {"plan.density", "plan.topk", "downlink.density", "downlink.window"} <= set(SCHEMA.options)


def test_density_warmup_is_one_schedule_for_every_codec_and_both_directions() -> None:
    warm = DensityWarmup(rounds=4, start=0.25)
    got = [warm.density(0.01, r) for r in range(1, 7)]
    assert got[0] == 0.25 and got[4:] == [0.01, 0.01]
    assert all(a > b for a, b in zip(got[:4], got[1:5]))
    np.testing.assert_allclose(got[2], 0.25 * (0.01 / 0.25) ** 0.5)
    assert DensityWarmup(0, 0.25).density(0.01, 1) == 0.01  # off
    assert warm.density(0.5, 1) == 0.5  # start below the target: off
    spec = CodecSpec.of(density=0.01, dense_below=64)
    assert warm.apply(spec, 1) == CodecSpec.of(density=0.25, dense_below=64)
    assert warm.apply(spec, 5) is spec
    assert warm.apply(CodecSpec("none"), 1) == CodecSpec("none")  # no density to schedule
    with pytest.raises(CodecError):
        DensityWarmup(rounds=-1)
    cfg = config_from_dict({**BASE, "warmup": {"rounds": 4, "start": 0.25}})
    assert cfg.warmup.apply(cfg.plan.codec, 1).density == cfg.warmup.apply(cfg.downlink.codec, 1).density == 0.25
