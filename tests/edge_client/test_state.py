"""Durable device state: residual and in-flight update committed together, model cache."""

from __future__ import annotations

import numpy as np
import pytest

from edge_client.state import DeviceState
from fedmq.codecs import CodecSpec, decode
from fedmq.errors import StateError
from fedmq.fl.feedback import ErrorFeedback
from fedmq.model.params import ParamSpec
from fedmq.tasks import get_task


@pytest.fixture
def spec() -> ParamSpec:
    return ParamSpec.from_module(get_task("digits-logreg").build_model(0))


def _compress(spec, seed=0):
    fb = ErrorFeedback(spec)
    update = np.random.default_rng(seed).standard_normal(spec.size).astype(np.float32)
    payload, sent = fb.compress(update, CodecSpec.of(density=0.1, dense_below=0))
    return fb, update, payload, sent


def test_fresh_state_has_zero_residual_and_no_update(tmp_path, spec):
    st = DeviceState(tmp_path)
    fb = st.load_feedback(spec)
    assert not fb.residual.any() and st.record.inflight is None and st.record.last_round == -1


def test_begin_update_survives_a_restart_with_matching_residual(tmp_path, spec):
    st = DeviceState(tmp_path)
    st.load_feedback(spec)
    fb, update, payload, sent = _compress(spec)
    st.begin_update(fb, payload, round=3, transfer_id="t3", base_version=2, deadline=123.0)

    again = DeviceState(tmp_path)
    assert again.read_inflight() == payload
    assert (again.record.inflight.round, again.record.inflight.transfer_id) == (3, "t3")
    fb2 = again.load_feedback(spec)
    np.testing.assert_array_equal(fb2.residual, fb.residual)
    # residual on disk + what is in flight == the true update
    np.testing.assert_allclose(fb2.residual + decode("topk-int8", again.read_inflight(), spec), update, atol=1e-6)


def test_files_of_an_uncommitted_change_are_ignored_and_removed(tmp_path, spec):
    st = DeviceState(tmp_path)
    st.load_feedback(spec)
    fb, _, payload, _ = _compress(spec)
    # A crash after the new files were written but before state.json was replaced:
    fb.save(tmp_path / "residual-1.npy")
    (tmp_path / "update-1.bin").write_bytes(payload)
    (tmp_path / ".state.json.abc.tmp").write_bytes(b"{")
    again = DeviceState(tmp_path)
    assert again.record.inflight is None
    assert not again.load_feedback(spec).residual.any()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "state.json"]


def test_commit_and_rollback(tmp_path, spec):
    st = DeviceState(tmp_path)
    st.load_feedback(spec)
    fb, update, payload, sent = _compress(spec)
    st.begin_update(fb, payload, round=1, transfer_id="a", base_version=0, deadline=1.0)
    st.commit()
    assert st.record.inflight is None and st.record.last_round == 1
    # The accepted update is kept (settled) until the next one is committed: a rerun of
    # round 1 gets the same bytes.
    assert st.record.settled is not None and (tmp_path / "update-1.bin").read_bytes() == payload

    fb, update, payload, sent = _compress(spec, seed=1)
    st.begin_update(fb, payload, round=2, transfer_id="b", base_version=1, deadline=1.0)
    assert st.record.settled is None and not (tmp_path / "update-1.bin").exists()
    st.rollback(fb, sent)
    again = DeviceState(tmp_path)
    assert again.record.inflight is None and again.record.last_round == 2
    np.testing.assert_allclose(again.load_feedback(spec).residual, update, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", f"residual-{again.record.seq}.npy", "state.json"]


def test_new_model_architecture_drops_old_residual(tmp_path, spec):
    st = DeviceState(tmp_path)
    st.load_feedback(spec)
    fb, _, payload, _ = _compress(spec)
    st.begin_update(fb, payload, round=1, transfer_id="a", base_version=0, deadline=1.0)
    other = ParamSpec.from_module(get_task("digits-mlp").build_model(0))
    fb_other = DeviceState(tmp_path).load_feedback(other)
    assert fb_other.residual.shape == (other.size,) and not fb_other.residual.any()
    again = DeviceState(tmp_path)
    assert again.record.inflight is None and again.record.spec_hash == other.hash


def test_corrupt_state_is_reported_with_its_path(tmp_path, spec):
    st = DeviceState(tmp_path)
    st.load_feedback(spec)
    fb, _, payload, _ = _compress(spec)
    st.begin_update(fb, payload, round=1, transfer_id="a", base_version=0, deadline=1.0)
    (tmp_path / "update-1.bin").write_bytes(payload[:-1] + b"\x00")
    with pytest.raises(StateError, match="update-1.bin"):
        DeviceState(tmp_path).read_inflight()
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(StateError, match="state.json"):
        DeviceState(tmp_path)


def test_readonly_view_removes_nothing(tmp_path, spec):
    DeviceState(tmp_path).load_feedback(spec)
    (tmp_path / "residual-9.npy").write_bytes(b"half-written")
    DeviceState(tmp_path, readonly=True)
    assert (tmp_path / "residual-9.npy").exists()


def test_model_cache_keeps_the_last_two_versions(tmp_path):
    st = DeviceState(tmp_path)
    for version in (1, 2, 3):
        st.cache_model(version, f"model {version}".encode())
    assert st.cached_versions() == [2, 3]
    assert st.cached_model(3) == b"model 3" and st.cached_model(1) is None


def test_the_deadline_of_the_last_round_is_kept_to_recognise_a_rerun(tmp_path, spec):
    # The agent trains again for a task of its last round only when that task's deadline is
    # later than the one it answered: the coordinator lost the round in a crash and reruns it.
    st = DeviceState(tmp_path)
    st.load_feedback(spec)
    fb, _, payload, _ = _compress(spec)
    st.begin_update(fb, payload, round=4, transfer_id="a", base_version=3, deadline=100.0)
    st.commit()
    assert (st.record.last_round, st.record.last_deadline) == (4, 100.0)
    st.finish_round(4, 250.0)  # the rerun of round 4, skipped
    st.finish_round(3, 900.0)  # an older round changes nothing
    again = DeviceState(tmp_path)
    assert (again.record.last_round, again.record.last_deadline) == (4, 250.0)


def test_a_second_agent_on_the_same_state_directory_is_refused(tmp_path):
    from edge_client.state import lock_state_dir

    held = lock_state_dir(tmp_path / "state")
    with pytest.raises(StateError, match="in use by another edge client"):
        lock_state_dir(tmp_path / "state")
    held.close()  # released (as when the owner dies): the next agent gets it
    lock_state_dir(tmp_path / "state").close()


def test_ledger_and_reopen_for_a_rerun(tmp_path, spec):
    st = DeviceState(tmp_path)
    st.load_feedback(spec)
    fb, update, payload, sent = _compress(spec)
    st.begin_update(fb, payload, round=3, transfer_id="t", base_version=2, deadline=10.0)
    st.commit()
    again = st.reopen(deadline=20.0)
    assert again.transfer_id == "t" and again.deadline == 20.0
    assert st.read_inflight() == payload and st.record.settled is None
    st.rollback(fb, sent, "late")
    ledger = DeviceState(tmp_path).record.ledger
    assert [(e.round, e.transfer_id, e.state, e.reason) for e in ledger] == [(3, "t", "rolled_back", "late")]
    # Rolled back: the residual holds the whole update again (nothing lost, nothing twice).
    np.testing.assert_allclose(fb.residual, update, atol=1e-6)
