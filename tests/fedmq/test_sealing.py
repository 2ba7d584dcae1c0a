"""Sealed client updates (fedmq.security.sealing): HPKE to the coordinator's key, the key files, the pin."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedmq.wire.envelope import ClientUpdate, decode_update, encode_update
from fedmq.errors import ConfigError, WireError
from fedmq.model.params import ParamSpec
from fedmq.security.sealing import (PIN_FILE, PRIVATE_KEY_FILE, PUBLIC_KEY_FILE, SEAL_OVERHEAD, KeyPinError, SealError,
                           fingerprint, is_sealed, load_or_create_key, load_public_key, pin_key, seal_update)
from fedmq.tasks import get_task

WHERE = {"federation": "f", "device": "dev-1", "transfer_id": "ab" * 16}


@pytest.fixture(scope="module")
def envelope() -> tuple[bytes, ParamSpec]:
    spec = ParamSpec.from_module(get_task("digits-logreg").build_model(0))
    data = encode_update(ClientUpdate(federation="f", device="dev-1", round=3, base_version=2, samples=40,
                                      kind="delta", spec_hash=spec.hash, codec="none",
                                      payload=b"\x3f\x80\x00\x00" * spec.size))
    return data, spec


def test_sealed_update_opens_only_with_the_pinned_key_and_its_binding(tmp_path, envelope) -> None:
    data, spec = envelope
    key = load_or_create_key(tmp_path / "coord")
    sealed = seal_update(data, load_public_key(key.public_path), **WHERE)
    assert is_sealed(sealed) and not is_sealed(data) and len(sealed) == len(data) + SEAL_OVERHEAD
    assert data not in sealed and data[-64:] not in sealed
    with pytest.raises(WireError):
        decode_update(sealed, spec)
    assert key.open_update(sealed, **WHERE) == data
    # Another coordinator's key: refused by its key id before any decryption.
    other = load_or_create_key(tmp_path / "other")
    with pytest.raises(SealError, match="sealed to coordinator key"):
        other.open_update(sealed, **WHERE)
    # Bound to federation, device and transfer: a replay under another one does not open.
    for field, value in (("device", "dev-2"), ("transfer_id", "cd" * 16), ("federation", "g")):
        with pytest.raises(SealError, match="does not authenticate"):
            key.open_update(sealed, **{**WHERE, field: value})
    tampered = bytearray(sealed)
    tampered[len(sealed) // 2] ^= 1
    with pytest.raises(SealError, match="does not authenticate"):
        key.open_update(bytes(tampered), **WHERE)
    with pytest.raises(SealError, match="not a sealed update"):
        key.open_update(sealed[:40], **WHERE)
    with pytest.raises(SealError, match="format version"):
        key.open_update(sealed[:4] + b"\x02" + sealed[5:], **WHERE)
    # Each update has its own ephemeral key: sealing twice gives different bytes.
    assert seal_update(data, key.public, **WHERE) != sealed


def test_key_pair_is_created_once_atomically_and_kept(tmp_path) -> None:
    folder = tmp_path / "state"
    keys = []
    # Two processes' worth of racing creators agree on one key.
    threads = [threading.Thread(target=lambda: keys.append(load_or_create_key(folder))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({fingerprint(k.public) for k in keys}) == 1
    assert stat.S_IMODE(os.stat(folder / PRIVATE_KEY_FILE).st_mode) == 0o600
    assert sorted(p.name for p in folder.iterdir()) == [PRIVATE_KEY_FILE, PUBLIC_KEY_FILE]
    # A lost public file is written again from the private key; the key never changes.
    (folder / PUBLIC_KEY_FILE).unlink()
    again = load_or_create_key(folder)
    assert fingerprint(again.public) == fingerprint(keys[0].public)
    assert fingerprint(load_public_key(folder / PUBLIC_KEY_FILE)) == fingerprint(keys[0].public)


def test_unreadable_keys_are_config_errors_naming_the_file(tmp_path) -> None:
    bad = tmp_path / "seal-key.pub"
    bad.write_text("not a key\n")
    with pytest.raises(ConfigError, match=str(bad)):
        load_public_key(bad)
    with pytest.raises(ConfigError, match="does-not-exist"):
        load_public_key(tmp_path / "does-not-exist")
    folder = tmp_path / "coord"
    folder.mkdir()
    (folder / PRIVATE_KEY_FILE).write_text("garbage\n")
    with pytest.raises(ConfigError, match=PRIVATE_KEY_FILE):
        load_or_create_key(folder)


def test_device_pins_the_key_and_refuses_a_changed_or_dropped_one(tmp_path) -> None:
    state = tmp_path / "device-state"
    first, second = X25519PrivateKey.generate().public_key(), X25519PrivateKey.generate().public_key()
    pin_key(state, None, "option 'coordinator_key'")   # nothing configured, nothing pinned: plain updates
    assert not (state / PIN_FILE).exists()
    pin_key(state, first, "coordinator.pub")
    assert (state / PIN_FILE).read_text().strip() == fingerprint(first)
    pin_key(state, first, "coordinator.pub")           # the same key again: fine
    with pytest.raises(KeyPinError, match="coordinator public key changed"):
        pin_key(state, second, "coordinator.pub")
    with pytest.raises(KeyPinError, match="refuses to send client updates in the clear"):
        pin_key(state, None, "option 'coordinator_key'")
    assert (state / PIN_FILE).read_text().strip() == fingerprint(first)

