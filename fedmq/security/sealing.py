"""Sealed client updates: a device encrypts its update to the coordinator's public key.

A broker that terminates TLS (often a hosted MQTT service) reads every message it relays. A
sealed update is the client-update envelope (:mod:`fedmq.wire.envelope`) encrypted with HPKE
(RFC 9180, "Hybrid Public Key Encryption"), base mode, single shot, with the suite
DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20-Poly1305, from the ``cryptography``
package (``cryptography.hazmat.primitives.hpke``): an X25519 key agreement with a fresh
ephemeral key per update, HKDF, an AEAD. Nothing here is a primitive of fedmq's own.

The whole envelope is sealed once, before chunking (docs/wire-format.md, "Sealed client
update"): the chunked transport carries the sealed bytes as an opaque blob, unchanged.

Byte layout (all of it on the wire, inside the chunked blob)::

    sealed := 0xc1 "FQS" | u8 version (= 1) | key_id[8] | enc[32] | ciphertext (plaintext + 16-byte tag)

* 0xc1 is the one byte msgpack never uses, so a sealed blob is never a valid envelope and
  an envelope never starts like a sealed blob;
* ``key_id``: the first 8 bytes of SHA-256 of the coordinator's raw 32-byte X25519 public
  key (which key the update was sealed to: a coordinator holding another key says so);
* ``enc``: HPKE's encapsulated key (the ephemeral X25519 public key);
* HPKE's ``info`` binds the ciphertext to where it travels:
  ``b"fedmq sealed update v1\\n" + federation + b"\\n" + device + b"\\n" + transfer_id`` (UTF-8),
  so a sealed update replayed under another device or transfer fails to open.

Keys: the coordinator's private key is ``seal-key.pem`` (PKCS#8 PEM, mode 0600) in its state
folder, its public key ``seal-key.pub`` (SubjectPublicKeyInfo PEM) beside it; both created
once, atomically, by :func:`load_or_create_key`. ``fedmq broker add-device
--coordinator-key`` copies the public key beside the device's credentials; the device pins
it (:func:`pin_key`) and refuses a changed one.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from fedmq.storage.atomic import atomic_write_bytes, fsync_dir
from fedmq.errors import ConfigError, FedmqError, WireError

#: First four bytes of every sealed update (0xc1 is never a msgpack type byte).
SEAL_MAGIC = b"\xc1FQS"
SEAL_VERSION = 1
KEY_ID_BYTES = 8
#: Bytes a sealed update adds to its envelope: magic, version, key id, HPKE enc, AEAD tag.
SEAL_OVERHEAD = len(SEAL_MAGIC) + 1 + KEY_ID_BYTES + 32 + 16
_HEADER = len(SEAL_MAGIC) + 1 + KEY_ID_BYTES
_INFO = b"fedmq sealed update v1\n"
_SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)

#: The coordinator's key files in its state folder.
PRIVATE_KEY_FILE = "seal-key.pem"
PUBLIC_KEY_FILE = "seal-key.pub"
#: The device's pin of the coordinator's public key, in its state folder.
PIN_FILE = "coordinator-key.pin"


class SealError(WireError):
    """A sealed update cannot be opened: truncated, another format version, sealed to another
    key (``key_id`` differs), or its ciphertext, tag or binding (federation, device,
    transfer) does not authenticate."""


class KeyPinError(FedmqError):
    """The coordinator's public key a device is configured with differs from the one it
    pinned (or the device pinned one and is configured with none)."""


def raw_public(key: X25519PublicKey) -> bytes:
    """The 32 raw bytes of an X25519 public key (RFC 7748)."""
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_pem(key: X25519PublicKey) -> bytes:
    """A public key as the key file holds it (SubjectPublicKeyInfo PEM, ``seal-key.pub``)."""
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def key_id(key: X25519PublicKey) -> bytes:
    """The 8-byte id of a coordinator public key: SHA-256 of its raw bytes, truncated."""
    return hashlib.sha256(raw_public(key)).digest()[:KEY_ID_BYTES]


def fingerprint(key: X25519PublicKey) -> str:
    """SHA-256 of the raw public key, 64 lower-case hex characters (what a device pins)."""
    return hashlib.sha256(raw_public(key)).hexdigest()


def _info(federation: str, device: str, transfer_id: str) -> bytes:
    return _INFO + f"{federation}\n{device}\n{transfer_id}".encode()


def is_sealed(data: bytes | memoryview) -> bool:
    """Whether ``data`` starts like a sealed update (the 4-byte magic)."""
    return bytes(data[:len(SEAL_MAGIC)]) == SEAL_MAGIC


def seal_update(envelope: bytes, public_key: X25519PublicKey, *, federation: str, device: str,
                transfer_id: str) -> bytes:
    """Encrypt a client-update envelope to the coordinator's public key.

    Args:
        envelope: the encoded :class:`fedmq.wire.envelope.ClientUpdate` (bytes).
        public_key: the coordinator's pinned X25519 public key.
        federation, device, transfer_id: where the update travels (bound into HPKE's info).

    Returns:
        The sealed update, ``len(envelope) + SEAL_OVERHEAD`` bytes.
    """
    header = SEAL_MAGIC + bytes([SEAL_VERSION]) + key_id(public_key)
    return header + _SUITE.encrypt(bytes(envelope), public_key, info=_info(federation, device, transfer_id))


@dataclass(frozen=True)
class CoordinatorKey:
    """The coordinator's key pair for sealed updates.

    Attributes:
        private: the X25519 private key (never leaves the coordinator's state folder).
        public: its public key, what devices pin.
        folder: the state folder holding both files.
    """

    private: X25519PrivateKey
    public: X25519PublicKey
    folder: Path

    @property
    def public_path(self) -> Path:
        """``seal-key.pub`` in the state folder: the file to give ``fedmq broker add-device``."""
        return self.folder / PUBLIC_KEY_FILE

    def open_update(self, data: bytes | memoryview, *, federation: str, device: str, transfer_id: str) -> bytes:
        """Decrypt a sealed update (bytes as assembled from the chunked blob).

        Returns:
            The client-update envelope (still to be checked by :func:`fedmq.wire.envelope.decode_update`).

        Raises:
            SealError: not a sealed update of version 1, sealed to another key, or the
                ciphertext, tag or binding (``federation``, ``device``, ``transfer_id``)
                does not authenticate.
        """
        blob = bytes(data)
        if len(blob) < _HEADER + 32 + 16 or not is_sealed(blob):
            raise SealError(f"sealed update from {device!r} (transfer {transfer_id}): {len(blob)} bytes is not a "
                            f"sealed update")
        if blob[len(SEAL_MAGIC)] != SEAL_VERSION:
            raise SealError(f"sealed update from {device!r}: format version {blob[len(SEAL_MAGIC)]}, expected "
                            f"{SEAL_VERSION}")
        sealed_to = blob[len(SEAL_MAGIC) + 1:_HEADER]
        if sealed_to != key_id(self.public):
            raise SealError(f"sealed update from {device!r}: sealed to coordinator key {sealed_to.hex()}, this "
                            f"coordinator holds {key_id(self.public).hex()} ({self.folder / PUBLIC_KEY_FILE}): "
                            f"the device pinned another coordinator's key")
        try:
            return _SUITE.decrypt(blob[_HEADER:], self.private, info=_info(federation, device, transfer_id))
        except InvalidTag:
            raise SealError(f"sealed update from {device!r} (transfer {transfer_id}): does not authenticate "
                            f"(tampered, or sealed for another device or transfer)") from None


def _create_once(path: Path, data: bytes) -> bool:
    """Write ``path`` atomically unless it exists (a temp file linked into place: never a torn
    or overwritten file). Returns whether this call created it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        fsync_dir(path.parent)
        return True
    finally:
        os.unlink(tmp)


def _load_private(path: Path) -> X25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: the coordinator's sealing key is unreadable ({exc})") from None
    if not isinstance(key, X25519PrivateKey):
        raise ConfigError(f"{path}: expected an X25519 private key (PKCS#8 PEM), got {type(key).__name__}")
    return key


def load_or_create_key(state_dir: str | os.PathLike[str]) -> CoordinatorKey:
    """The coordinator's key pair in ``state_dir``, created there on first use.

    The private key file is created once (mode 0600, written to a temporary file and linked
    into place, so two processes racing agree on one key and a kill leaves no torn file);
    the public key file is (re)written from it atomically when missing.

    Raises:
        ConfigError: the private key file is unreadable or not an X25519 key (names the path).
        OSError: the state folder cannot be written.
    """
    folder = Path(state_dir)
    private_path = folder / PRIVATE_KEY_FILE
    if not private_path.is_file():
        fresh = X25519PrivateKey.generate().private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption())
        _create_once(private_path, fresh)
    private = _load_private(private_path)
    public = private.public_key()
    pem = public_pem(public)
    public_path = folder / PUBLIC_KEY_FILE
    try:
        current = public_path.read_bytes()
    except FileNotFoundError:
        current = b""
    if current != pem:
        atomic_write_bytes(public_path, pem)
    return CoordinatorKey(private, public, folder)


def load_public_key(path: str | os.PathLike[str]) -> X25519PublicKey:
    """A coordinator public key file (SubjectPublicKeyInfo PEM, ``seal-key.pub``).

    Raises:
        ConfigError: missing, unreadable or not an X25519 public key (names the path).
    """
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: the coordinator's public key is unreadable ({exc})") from None
    if not isinstance(key, X25519PublicKey):
        raise ConfigError(f"{path}: expected the coordinator's X25519 public key (PEM), got {type(key).__name__}")
    return key


def pin_key(state_dir: str | os.PathLike[str], key: X25519PublicKey | None, source: str) -> None:
    """Pin the coordinator's public key in a device's state folder (trust on first use of the
    provisioned key), or check it against the pin.

    Args:
        state_dir: the device's state folder (the pin is ``coordinator-key.pin`` there).
        key: the key the device is configured with (None: no ``coordinator_key``).
        source: where it came from, for messages (the option and file).

    Raises:
        KeyPinError: a pin exists and ``key`` differs from it, or is None (a device that
            sealed once never falls back to sending updates in the clear).
    """
    pin_path = Path(state_dir) / PIN_FILE
    try:
        pinned = pin_path.read_text().strip()
    except FileNotFoundError:
        pinned = ""
    if key is None:
        if pinned:
            raise KeyPinError(f"{pin_path}: this device pinned coordinator key {pinned[:16]}... but {source} is not "
                              f"set: it refuses to send client updates in the clear. Configure the coordinator's "
                              f"public key again (fedmq broker add-device --coordinator-key)")
        return
    found = fingerprint(key)
    if not pinned:
        _create_once(pin_path, (found + "\n").encode())
        pinned = pin_path.read_text().strip()
    if pinned != found:
        raise KeyPinError(f"coordinator public key changed: {source} has fingerprint {found[:16]}..., this device "
                          f"pinned {pinned[:16]}... ({pin_path}). A changed key is refused: if the coordinator's "
                          f"key was replaced on purpose, provision the device again and remove {pin_path}")
