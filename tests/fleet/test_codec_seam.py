"""A codec with parameters of its own is one module plus a registry line
(tests/fleet/plugins/random_k_codec.py): its parameters are read from ``[plan]`` and
``[downlink]``, checked by the codec, carried in the plan on the wire and scheduled like any
density, with no edit to the coordinator, the agent or the configuration code; the same seeded
federation runs it both ways over the in-memory bus and through mosquitto."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from coordinator.config import config_from_dict
from fedmq.codecs import CodecSpec, decode_sparse, encode
from fedmq.codecs.schedule import DensityWarmup
from fedmq.errors import ConfigError
from fedmq.wire.messages import RoundTask, TrainPlan
from fedmq.model.params import ParamSpec
from tests.fleet.test_simulator import _plugin, _run

PARAMS = 85_002  # the digits MLP
PLAN = {"local_epochs": 1, "k_fraction": 0.1}


def test_the_codec_validates_its_own_parameters_everywhere() -> None:
    _plugin("random_k_codec")
    base = {"federation": "f", "task": "digits-mlp"}
    cfg = config_from_dict({**base, "plan": {"codec": "test-random-k", "k_fraction": 0.2, "density": 0.5},
                            "downlink": {"codec": "test-random-k", "seed_mode": "rng"}})
    assert cfg.plan.codec == CodecSpec.of("test-random-k", k_fraction=0.2)
    assert cfg.downlink.codec == CodecSpec.of("test-random-k", seed_mode="rng")
    for table in ({"plan": {"codec": "test-random-k", "k_fraction": 0.0}},
                  {"downlink": {"codec": "test-random-k", "seed_mode": "sometimes"}}):
        with pytest.raises(ConfigError, match="test-random-k: "):
            config_from_dict({**base, **table})
    plan = TrainPlan(codec=CodecSpec.of("test-random-k", k_fraction=0.25))
    assert RoundTask.from_bytes(RoundTask("f", "d", 1, 0, "0" * 16, 1.0, plan).to_bytes()).plan == plan
    assert DensityWarmup(4, 0.5).apply(plan.codec, 1).params.k_fraction == 0.5  # its density is scheduled too
    spec = ParamSpec(("w",), ((1000,),), ("float32",))
    vec = np.arange(1000, dtype=np.float32)
    payload = encode(vec, spec, plan.codec)
    assert payload == encode(vec, spec, plan.codec) and len(payload) == 4 + 8 * 250  # seeded by the content
    assert decode_sparse("test-random-k", payload, spec).nnz == 250


def _bytes_per_update() -> int:
    return 4 + 8 * math.ceil(0.1 * PARAMS)


def test_random_k_end_to_end_on_the_memory_bus_and_through_mosquitto(tmp_path: Path, mosquitto) -> None:
    _plugin("random_k_codec")
    kw = dict(codec="test-random-k", rounds=2, train_plan=PLAN, devices_in="threads")
    memory = _run(tmp_path / "memory", broker="memory", **kw)
    real = _run(tmp_path / "mosquitto", broker=mosquitto.url, protocol=mosquitto.protocol, **kw)
    for out in (memory, real):
        assert out["rounds_failed"] == 0 and out["updates_accepted"] == 4
        assert out["codec"] == out["downlink_codec"] == "test-random-k"
        # Every update carried a tenth of the coordinates, as the codec's own parameter says.
        assert 4 * _bytes_per_update() < out["bytes_up_total"] < 1.02 * 4 * _bytes_per_update()
        assert out["final_accuracy"] > out["initial_accuracy"]
    assert memory["accuracy_per_round"] == real["accuracy_per_round"]
    assert [r["bytes_up"] for r in memory["records"]] == [r["bytes_up"] for r in real["records"]]
