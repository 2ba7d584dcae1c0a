"""Differential privacy inside secure rounds: distributed discrete Gaussian noise
(fedmq.privacy.discrete). The noisy masked sum equals the plain sum of the clipped integer
inputs plus the survivors' noise, which never enters a residual; the epsilon the coordinator
states is checked against an independent computation (the exact privacy loss distribution of
the noisy sum, and dp-accounting composing the zCDP bound computed here)."""

from __future__ import annotations

import json
import math
import threading
from dataclasses import replace

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp
from dp_accounting.pld import privacy_loss_distribution as pld

from coordinator.config import config_from_dict
from fedmq.errors import WireError
from fedmq.privacy.accountant import PrivacyLedger, RoundCharge
from fedmq.privacy.discrete import ddg_rho, discrete_gaussian, l2_sensitivity, noise_headroom
from fedmq.secagg import RingSpec, values_on_support
from fedmq.secagg import messages as sm
from tests.coordinator.test_secure_round import DEVICES, FED, N, SETTINGS, SIZE, Fleet, bus, coordinator_side  # noqa: F401

CLIP, STD = 0.3, 40.0


def test_a_noisy_secure_sum_is_the_plain_sum_plus_the_survivors_noise(bus, tmp_path) -> None:  # noqa: F811
    secure, refused, _ = coordinator_side(bus, tmp_path)
    support = np.arange(SIZE, dtype=np.int64)  # every coordinate: enough samples to measure the noise
    with Fleet(bus) as fleet:
        outcome = secure.run(3, DEVICES, size=SIZE, support=support, seed=11, deadline=secure.io.clock() + 30,
                             noise=(CLIP, STD))
        secure.publish_result(outcome)
        done = threading.Event()
        for _ in range(400):  # the results travel through the bus thread
            if len(fleet.settled) == N or done.wait(0.025):
                break
    assert outcome.state == "closed" and set(outcome.survivors) == set(DEVICES), outcome.reason
    assert not refused
    scale = SETTINGS.scale
    # Independently: each device's values clipped to L2 norm CLIP, truncated towards zero.
    clean = {}
    for d in DEVICES:
        v = fleet.vectors[d].astype(np.float64)
        v = v * min(1.0, CLIP / np.linalg.norm(v) * (1 - 1e-12))
        clean[d] = np.trunc(v * scale).astype(np.int64)
        assert np.linalg.norm(clean[d]) <= l2_sensitivity(CLIP, scale)
    noise = outcome.total - np.sum([clean[d] for d in DEVICES], axis=0)
    # N devices' discrete Gaussians of variance STD^2 on SIZE coordinates: the sample variance
    # is within 15% (about 5 standard errors) of N * STD^2, the mean near 0.
    assert abs(noise.var() / (N * STD ** 2) - 1) < 0.15, noise.var() / (N * STD ** 2)
    assert abs(noise.mean()) < 5 * math.sqrt(N) * STD / math.sqrt(SIZE)
    # The noise never enters a residual: what left each residual is the clean input.
    assert all(fleet.settled.values())
    for d in DEVICES:
        np.testing.assert_array_equal(fleet.residual[d], fleet.vectors[d] - (clean[d] / scale).astype(np.float32))


def test_a_noisy_input_is_clipped_then_truncated_and_the_ring_holds_its_noise() -> None:
    ring = RingSpec(CLIP, 2.0 ** 12, 50, noise_headroom(STD))
    vector = np.random.default_rng(1).normal(0, 1.0, 500).astype(np.float32)
    support = np.arange(0, 500, 2)
    q, sent = values_on_support(vector, support, ring, l2_clip=CLIP)
    assert np.linalg.norm(q) <= ring.scale * CLIP and np.all(np.abs(q) <= np.abs(vector[support]) * ring.scale)
    noisy = q + discrete_gaussian(STD, q.size)
    assert noisy.dtype == np.int64 and np.any(noisy != q)
    # 50 such inputs at the headroom's extreme still decode exactly
    worst = np.full(q.size, ring.qmax + ring.noise, dtype=np.int64)
    total = np.sum([ring.encode(worst) for _ in range(50)], axis=0, dtype=np.uint64)
    np.testing.assert_array_equal(ring.decode_sum(total), 50 * worst)
    np.testing.assert_array_equal(ring.decode_sum(ring.encode(-worst) * np.uint64(50)), -50 * worst)


def _discrete_gaussian_log_pmf(std: float, devices: int, span: int) -> np.ndarray:
    """log PMF on [-span, span] of the sum of ``devices`` independent N_Z(0, std^2), by convolution."""
    x = np.arange(-span, span + 1)
    one = np.exp(-x.astype(np.float64) ** 2 / (2 * std ** 2))
    one /= one.sum()
    total = one
    for _ in range(devices - 1):
        total = np.convolve(total, one)
    mid = (total.size - 1) // 2
    total = total[mid - span: mid + span + 1]
    return np.log(np.maximum(total, 1e-300))


@pytest.mark.parametrize("std,devices,l2,rounds", [(2.0, 3, 4, 1), (3.0, 5, 6, 10), (1.0, 4, 3, 5)])
def test_the_discrete_bound_holds_against_the_exact_privacy_loss_distribution(std, devices, l2, rounds) -> None:
    """One coordinate (d = 1), neighbouring inputs 0 and l2: the exact privacy loss of the
    noisy sum (dp-accounting's PLD of the two probability mass functions, composed over the
    rounds) never exceeds what the stated zCDP bound gives, and is not far below it."""
    span = int(12 * std * math.sqrt(devices)) + l2
    logp = _discrete_gaussian_log_pmf(std, devices, span)
    values = range(-span, span + 1)
    lower = dict(zip(values, logp))
    upper = {v + l2: p for v, p in lower.items()}
    exact = pld.from_two_probability_mass_functions(lower, upper, log_mass_truncation_bound=-60)
    exact = exact.self_compose(rounds)
    delta = 1e-5
    eps_exact = exact.get_epsilon_for_delta(delta)
    acc = rdp.RdpAccountant()
    acc.compose(dp_accounting.ZCDpEvent(ddg_rho(l2, std, devices, 1)), rounds)
    eps_stated = acc.get_epsilon(delta)
    assert eps_exact <= eps_stated <= 2.0 * eps_exact + 0.1, (eps_exact, eps_stated)


def test_a_ledger_of_discrete_rounds_resumes_and_equals_dp_accounting() -> None:
    rho = ddg_rho(4096.0, 1500.0, 20, 50_000)
    # Independently: tau is below 1e-300 here, so rho is Delta^2 / (2 n std^2).
    assert rho == pytest.approx(4096.0 ** 2 / (2 * 20 * 1500.0 ** 2), rel=1e-12)
    ledger = PrivacyLedger("poisson", 1e-5)
    for r in range(1, 6):
        ledger.charge(RoundCharge(r, "poisson", 100, 0, 0.2, 1.0, rho))
    resumed = PrivacyLedger.from_json(ledger.to_json(), "poisson", 1e-5, "test")
    acc = rdp.RdpAccountant()
    acc.compose(dp_accounting.ZCDpEvent(rho), 5)
    assert resumed.epsilon() == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9) == ledger.epsilon()
    # A ledger written before discrete rounds existed (no rho) still reads.
    old = json.dumps([{"round": 1, "sampling": "poisson", "population": 10, "sample": 0, "rate": 0.5, "sigma": 1.0}])
    assert PrivacyLedger.from_json(old, "poisson", 1e-5, "test").rounds_charged == 1


def test_a_device_without_the_sampler_refuses_a_private_round_and_an_old_one_cannot_read_it(monkeypatch) -> None:
    import edge_client.secure as device_side

    setup = sm.NoisySetup(1, "0123456789abcdef", ("a", "b"), 8, sm.Setup.bitmap(np.array([1]), 8), CLIP, 4096.0,
                          7, 1, 1, 1e12, noise_std=STD)
    assert sm.decode_downlink(setup.to_bytes()) == setup
    with pytest.raises(WireError, match="expected a 'sa_setup' message"):
        sm.Setup.from_bytes(setup.to_bytes())  # what a device before sa_setup_dp does with it
    with pytest.raises(WireError, match="noise_std"):
        sm.decode_downlink(replace(setup, noise_std=0.5).to_bytes())

    class Published(list):
        def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
            self.append(topic)

    sent = Published()
    monkeypatch.setattr(device_side, "sampler_available", lambda: False)  # a device without opendp
    device = device_side.SecureDevice(FED, "a", sent, size=8, settle=lambda _p, _i: None)
    device.handle(setup.to_bytes())
    assert device.refused == {"secagg_no_noise_sampler": 1} and sent == []  # no keys: it takes no part


@pytest.mark.parametrize("noise,ok", [("distributed", True), ("central", False)])
def test_secure_rounds_take_privacy_with_distributed_noise_only(noise, ok) -> None:
    raw = {"federation": "f", "task": "digits-logreg", "secure_aggregation": {"enabled": True},
           "privacy": {"enabled": True, "noise": noise, "noise_multiplier": 1.0}}
    if ok:
        assert config_from_dict(raw).privacy.noise == "distributed"
    else:
        with pytest.raises(Exception, match="distributed"):
            config_from_dict(raw)


def test_a_private_secure_federation_states_the_epsilon_of_its_survivors_noise(tmp_path) -> None:
    """The real coordinator and edge agents (threads, memory bus), secure rounds with
    distributed discrete noise: every round closes, and the epsilon in the summary equals
    dp-accounting's composition of the zCDP bound computed here from the survivors' count."""
    from rich.console import Console

    from fleet.demo import DemoSettings, run_demo

    sigma, clip, rounds, per_round = 0.8, 1.0, 3, 5
    summary = run_demo(DemoSettings(
        devices=6, per_round=per_round, rounds=rounds, broker="memory", devices_in="threads",
        secure_aggregation=True, privacy={"noise": "distributed", "noise_multiplier": sigma, "clip_norm": clip,
                                          "sampling": "without-replacement"},
        write_files=False, publish_onnx=False, out=tmp_path / "demo", deadline_s=30), console=Console(quiet=True))
    records = summary["records"]
    assert [r["state"] for r in records] == ["closed"] * rounds
    scale = type(SETTINGS).model_fields["scale"].default
    acc = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    for r in records:
        survivors, expected = r["accepted"], per_round
        std = sigma * scale * clip / math.sqrt(expected)
        # replace-one: the sum moves by up to twice scale * C; tau is below 1e-300 at this std
        acc.compose(dp_accounting.ZCDpEvent((2 * scale * clip) ** 2 / (2 * survivors * std ** 2)))
    assert summary["privacy"]["epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-6)
    assert summary["privacy"]["rounds_charged"] == rounds
    assert np.isfinite(summary["final_accuracy"])
