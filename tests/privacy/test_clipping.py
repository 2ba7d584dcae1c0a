"""Clipping as sent: the vector the coordinator decodes never has an L2 norm above C."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedmq.codecs import CodecSpec, codec_names, decode
from fedmq.wire.envelope import decode_update
from fedmq.fl.feedback import ErrorFeedback
from fedmq.fl.client import package_update
from fedmq.fl.training import LocalResult
from fedmq.wire.messages import RoundTask, TrainPlan
from fedmq.model.params import ParamSpec
from fedmq.privacy.clipping import encode_clipped, l2_norm

SPEC = ParamSpec(("conv.weight", "conv.bias", "fc.weight"), ((8, 1, 5, 5), (8,), (10, 300)),
                 ("float32",) * 3)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(codec=st.sampled_from(codec_names()), error_feedback=st.booleans(), stochastic=st.booleans(),
       density=st.sampled_from([0.002, 0.05, 1.0]), topk=st.sampled_from(["global", "per-tensor"]),
       clip=st.sampled_from([1e-4, 0.05, 1.0, 30.0]),
       rounds=st.lists(st.tuples(st.integers(0, 2**31), st.sampled_from([1e-3, 1.0, 100.0])), min_size=1, max_size=6))
def test_decoded_sent_vector_never_exceeds_the_clip_norm(codec, error_feedback, stochastic, density, topk, clip,
                                                         rounds) -> None:  # type: ignore[no-untyped-def]
    plan = TrainPlan(codec=CodecSpec.from_table(codec, dict(density=density, stochastic=stochastic, topk=topk)),
                     error_feedback=error_feedback, clip_norm=clip)
    feedback = ErrorFeedback(SPEC)
    total = np.zeros(SPEC.size, np.float64)
    received = np.zeros(SPEC.size, np.float64)
    for r, (seed, scale) in enumerate(rounds, start=1):
        rng = np.random.default_rng(seed)
        update = (scale * rng.standard_normal(SPEC.size) * (rng.random(SPEC.size) < 0.7)).astype(np.float32)
        total += update
        task = RoundTask("fed", "dev", r, r - 1, SPEC.hash, 0.0, plan)
        packed = package_update(LocalResult(update, "delta", 10, 1, 1, 0.0, {}), task, federation="fed",
                                device="dev", spec=SPEC, feedback=feedback, seed=seed)
        env = decode_update(packed.data, SPEC)
        decoded = decode(env.codec, env.payload, SPEC)
        assert l2_norm(decoded) <= clip, (l2_norm(decoded), clip)
        np.testing.assert_array_equal(decoded, packed.sent)
        assert env.metrics["dp_unclipped"] in (0.0, 1.0)
        received += decoded
    if error_feedback:
        # What clipping held back stays in the residual: nothing is lost.
        np.testing.assert_allclose(received + feedback.residual, total, rtol=1e-4, atol=1e-3 * max(
            1.0, float(np.abs(total).max())))
    else:
        assert not feedback.residual.any()


def test_a_vector_within_the_clip_norm_is_sent_as_without_clipping() -> None:
    rng = np.random.default_rng(0)
    vec = (0.001 * rng.standard_normal(SPEC.size)).astype(np.float32)
    config = CodecSpec.of(name="topk-int8", density=0.05)
    payload, sent = encode_clipped(vec, SPEC, config, clip_norm=10.0)
    assert l2_norm(sent) < 10.0
    np.testing.assert_array_equal(sent, decode("topk-int8", payload, SPEC))


def test_a_long_vector_is_sent_at_the_clip_norm_in_its_own_direction() -> None:
    rng = np.random.default_rng(1)
    vec = rng.standard_normal(SPEC.size).astype(np.float32)
    _, sent = encode_clipped(vec, SPEC, CodecSpec.of(name="none"), clip_norm=0.5)
    assert 0.5 * (1 - 1e-4) <= l2_norm(sent) <= 0.5
    np.testing.assert_allclose(sent / l2_norm(sent), vec / l2_norm(vec), atol=1e-6)


def test_a_distributed_noise_share_is_added_after_clipping_and_not_kept_in_the_residual() -> None:
    plan = TrainPlan(codec=CodecSpec("none"), clip_norm=0.1, noise_std=0.05)
    feedback = ErrorFeedback(SPEC)
    update = np.full(SPEC.size, 0.01, np.float32)
    packed = package_update(LocalResult(update, "delta", 10, 1, 1, 0.0, {}), RoundTask("fed", "dev", 1, 0, SPEC.hash, 0.0,
                                                                                   plan),
                            federation="fed", device="dev", spec=SPEC, feedback=feedback, seed=0)
    env = decode_update(packed.data, SPEC)
    decoded = decode(env.codec, env.payload, SPEC)
    assert l2_norm(packed.sent) <= 0.1
    noise = decoded - packed.sent
    assert abs(float(noise.std()) - 0.05) < 0.005
    np.testing.assert_allclose(feedback.residual + packed.sent, update, atol=1e-6)
