"""The device agent seals its client updates (fedmq.security.sealing), as a separate process over a real
mosquitto: kill -9 between committing and publishing resends the same sealed bytes, which
open with the coordinator's key to the update the device committed; a changed key stops the
agent with a clear error."""

from __future__ import annotations

import numpy as np
import pytest

from edge_client.agent import EdgeAgent
from edge_client.config import load_config
from fedmq.security.sealing import PIN_FILE, KeyPinError, fingerprint, is_sealed, load_or_create_key

from tests.edge_client.test_agent import DEV, FED, Coordinator, Device, sent_vector, true_update

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def sealed(tmp_path, mosquitto):
    key = load_or_create_key(tmp_path / "coordinator-state")
    coord = Coordinator(mosquitto)
    device = Device(tmp_path, mosquitto)
    device.config.write_text(f'coordinator_key = "{key.public_path}"\n' + device.config.read_text())
    yield key, coord, device
    if device.proc is not None and device.proc.poll() is None:
        device.proc.kill()
        device.proc.wait(30)
    coord.close()


def test_kill_before_publishing_resends_the_same_sealed_update(sealed) -> None:
    key, coord, device = sealed
    device.start(pause_at="publishing")
    coord.task(1)
    device.wait_paused("publishing")
    committed = device.record()["inflight"]
    plain = device.inflight_bytes()
    wire = (device.state / committed["sealed_file"]).read_bytes()
    residual_before = device.residual(coord.spec)
    device.kill9()
    assert coord.rx.stats["manifests"] == 0

    device.start()
    tid, data = coord.next_update()
    assert (tid, data) == (committed["transfer_id"], wire) and is_sealed(data)
    opened = key.open_update(data, federation=FED, device=DEV, transfer_id=tid)
    assert opened == plain
    sent1 = sent_vector(coord, opened, 1)
    np.testing.assert_allclose(sent1 + residual_before, true_update(coord, device, 1), atol=2e-5)
    coord.receipt(1, tid, "accepted")
    device.stop()
    assert device.record()["inflight"] is None


def test_a_changed_coordinator_key_stops_the_agent(sealed, tmp_path) -> None:
    key, _coord, device = sealed
    # Construction reads the key and pins it (no network yet).
    first = EdgeAgent(load_config(device.config, environ={}))
    first._state_lock.close()  # noqa: SLF001 - releases the state folder for the next agent
    assert (device.state / PIN_FILE).read_text().strip() == fingerprint(key.public)
    other = load_or_create_key(tmp_path / "another-coordinator")
    device.config.write_text(device.config.read_text().replace(str(key.public_path), str(other.public_path)))
    with pytest.raises(KeyPinError, match="coordinator public key changed"):
        EdgeAgent(load_config(device.config, environ={}))
