"""Server optimizers against steps computed by hand (Reddi et al. 2020, Algorithm 2)."""

import math

import numpy as np
import pytest

from fedmq.fl.server_opt import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedYogi, make_server_optimizer
from fedmq.errors import ConfigError, StateError


def test_fedavg_with_server_lr_one_is_plain_averaging():
    x = np.array([1.0, -2.0], dtype=np.float32)
    FedAvg().step(x, np.array([0.5, 0.25], dtype=np.float32))
    assert x.tolist() == [1.5, -1.75]


def test_fedavg_server_lr_scales_the_step():
    x = np.zeros(1, dtype=np.float32)
    FedAvg(eta=0.5).step(x, np.array([2.0], dtype=np.float32))
    assert x.tolist() == [1.0]


def test_fedavgm_accumulates_momentum_over_two_rounds():
    x = np.zeros(1, dtype=np.float32)
    opt = FedAvgM(eta=1.0, momentum=0.5)
    opt.step(x, np.array([1.0], dtype=np.float32))   # m = 1, x = 1
    opt.step(x, np.array([1.0], dtype=np.float32))   # m = 0.5 + 1 = 1.5, x = 2.5
    assert x[0] == pytest.approx(2.5)
    assert opt.m[0] == pytest.approx(1.5)


def _adaptive_by_hand(kind, deltas, eta=0.1, b1=0.9, b2=0.99, tau=1e-3):
    x, m, v = 0.0, 0.0, tau * tau
    for d in deltas:
        m = b1 * m + (1 - b1) * d
        if kind == "adagrad":
            v = v + d * d
        elif kind == "yogi":
            v = v - (1 - b2) * d * d * math.copysign(1.0, v - d * d) if v != d * d else v
        else:
            v = b2 * v + (1 - b2) * d * d
        x = x + eta * m / (math.sqrt(v) + tau)
    return x, m, v


@pytest.mark.parametrize("cls,kind", [(FedAdagrad, "adagrad"), (FedYogi, "yogi"), (FedAdam, "adam")])
def test_adaptive_optimizers_match_hand_computed_steps(cls, kind):
    deltas = [0.2, -0.1, 0.05]
    x = np.zeros(1, dtype=np.float32)
    opt = cls(eta=0.1)
    for d in deltas:
        opt.step(x, np.array([d], dtype=np.float32))
    want_x, want_m, want_v = _adaptive_by_hand(kind, deltas)
    assert x[0] == pytest.approx(want_x, rel=1e-5)
    assert opt.m[0] == pytest.approx(want_m, rel=1e-5)
    assert opt.v[0] == pytest.approx(want_v, rel=1e-5)


def test_fedadam_first_step_has_no_bias_correction():
    # m = 0.1 * d, v = 0.99 tau^2 + 0.01 d^2: the step is far from Adam's bias-corrected eta * sign(d).
    x = np.zeros(1, dtype=np.float32)
    FedAdam(eta=1.0, tau=1e-3).step(x, np.array([1.0], dtype=np.float32))
    want = 0.1 / (math.sqrt(0.99e-6 + 0.01) + 1e-3)
    assert x[0] == pytest.approx(want, rel=1e-5)


def test_optimizer_state_round_trips_bit_for_bit():
    rng = np.random.default_rng(0)
    x = rng.normal(size=100).astype(np.float32)
    opt = make_server_optimizer("fedyogi", eta=0.01)
    opt.step(x, rng.normal(size=100).astype(np.float32))
    saved = {k: v.copy() for k, v in opt.state_arrays().items()}
    clone = make_server_optimizer("fedyogi", eta=0.01)
    clone.load_state_arrays(saved, 100)
    d = rng.normal(size=100).astype(np.float32)
    x2 = x.copy()
    opt.step(x, d)
    clone.step(x2, d)
    assert np.array_equal(x, x2)


def test_load_state_rejects_wrong_shape():
    opt = make_server_optimizer("fedadam")
    with pytest.raises(StateError, match="'m'"):
        opt.load_state_arrays({"m": np.zeros(3, np.float32), "v": np.zeros(4, np.float32)}, 4)


def test_unknown_optimizer_and_foreign_option_are_config_errors():
    with pytest.raises(ConfigError, match="unknown optimizer 'sgd'"):
        make_server_optimizer("sgd")
    with pytest.raises(ConfigError, match="momentum"):
        make_server_optimizer("fedadam", momentum=0.9)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        FedAvg().step(np.zeros(2, np.float32), np.zeros(3, np.float32))
