"""The sealed copy of the update in flight: kept with it, checked on read, collected with it."""

from __future__ import annotations

import numpy as np
import pytest

from edge_client.state import DeviceState
from fedmq.codecs import CodecSpec
from fedmq.errors import StateError
from fedmq.fl.feedback import ErrorFeedback
from fedmq.model.params import ParamSpec
from fedmq.tasks import get_task


def test_sealed_copy_survives_a_restart_and_goes_with_its_update(tmp_path) -> None:
    spec = ParamSpec.from_module(get_task("digits-logreg").build_model(0))
    st = DeviceState(tmp_path)
    st.load_feedback(spec)
    fb = ErrorFeedback(spec)
    payload, sent = fb.compress(np.ones(spec.size, np.float32), CodecSpec.of(density=0.1, dense_below=0))
    st.begin_update(fb, payload, round=1, transfer_id="t1", base_version=0, deadline=1.0, sealed=b"\xc1FQS-one")
    again = DeviceState(tmp_path)
    assert again.read_wire() == b"\xc1FQS-one" and again.read_inflight() == payload
    first = again.record.inflight.sealed_file
    again.commit()
    assert (tmp_path / first).is_file(), "kept while settled: a rerun of the round sends the same bytes"
    again.begin_update(fb, payload, round=2, transfer_id="t2", base_version=1, deadline=2.0, sealed=b"\xc1FQS-two")
    assert not (tmp_path / first).exists()
    (tmp_path / again.record.inflight.sealed_file).write_bytes(b"\xc1FQS-tampered")
    with pytest.raises(StateError, match="sealed client update corrupt"):
        again.read_wire()
    # Without a sealed copy the envelope itself is what is published.
    again.rollback(fb, sent)
    again.begin_update(fb, payload, round=3, transfer_id="t3", base_version=2, deadline=3.0)
    assert again.read_wire() == payload and again.record.inflight.sealed_file == ""
