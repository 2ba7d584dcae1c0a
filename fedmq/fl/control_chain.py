"""Scaffold's server control variate on the compressed downlink: its own version chain.

The server control variate ``c`` (float32 ``(d,)``, :mod:`fedmq.fl.scaffold`) reaches the
devices the way the global model does over a compressed downlink (docs/wire-format.md,
"Downlink: Scaffold's control variate"), on topics of its own under the model's tree
(readable by every device under the shipped ACL, carried by routed bridges):

* ``fedmq/F/model/control/delta/V``: a :class:`fedmq.fl.chain.DeltaBlob` (retained, chunked)
  turning the published ``c`` of version ``V-1`` into version ``V``'s, compressed with the
  downlink codec and server-side error feedback (:func:`fedmq.fl.downlink.compress_step`);
* ``fedmq/F/model/control/V``: a :class:`ControlSnapshot` (retained, chunked), the whole
  published ``c`` of version ``V``, every ``snapshot_every`` versions and at every start;
* ``fedmq/F/model/control/chain``: a :class:`fedmq.fl.chain.ModelChain` (retained) in the model
  chain's layout: ``latest`` and its hash, the snapshot, the deltas of the window. Version 0
  is the zero vector (``origin_sha256`` its hash; ``seed`` is 0 and unused).

The control variate's version is the global model's: ``c`` of version ``V`` is the one after
the round that produced model version ``V``, and a task for model version ``V`` trains with
it. Devices that predate Scaffold never subscribe to these topics.
"""

from __future__ import annotations

import queue
import struct
import time
from dataclasses import dataclass

import numpy as np

from fedmq.wire import topics
from fedmq.fl.chain import DeltaBlob, ModelChain
from fedmq.errors import SpecMismatchError, TransferError, WireError
from fedmq.fl.downlink import params_sha256, choose_catch_up
from fedmq.model.params import ParamSpec
from fedmq.transport import Link, Message
from fedmq.transport.flows import fetch_blob

SNAPSHOT_MAGIC = b"FMQC"
SNAPSHOT_LAYOUT = 1
#: magic, layout, spec hash (8 raw bytes), version, params SHA-256 (32 raw bytes), element count.
_SNAPSHOT_HEAD = struct.Struct("<4sB8sQ32sQ")


def chain_topic(fed: str) -> str:
    """Retained version chain of the server control variate."""
    return f"{topics.ROOT}/{fed}/model/control/chain"


def delta_topic(fed: str, version: int) -> str:
    """Base topic of the retained delta blob producing control variate ``version``."""
    return f"{topics.ROOT}/{fed}/model/control/delta/{int(version)}"


def snapshot_topic(fed: str, version: int) -> str:
    """Base topic of the retained snapshot of control variate ``version``."""
    return f"{topics.ROOT}/{fed}/model/control/{int(version)}"


@dataclass(frozen=True)
class ControlSnapshot:
    """The whole published control variate of one version.

    Byte layout: ``FMQC``, layout byte 1, the ParamSpec hash (8 raw bytes), version (uint64
    LE), :func:`fedmq.fl.downlink.params_sha256` of the vector (32 raw bytes), the element
    count (uint64 LE), then the float32 little-endian values.
    """

    spec_hash: str
    version: int
    vector: np.ndarray

    def to_bytes(self) -> bytes:
        vec = np.ascontiguousarray(self.vector, dtype="<f4")
        return _SNAPSHOT_HEAD.pack(SNAPSHOT_MAGIC, SNAPSHOT_LAYOUT, bytes.fromhex(self.spec_hash), self.version,
                                   bytes.fromhex(params_sha256(vec.astype(np.float32))), vec.size) + vec.tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, spec: ParamSpec) -> ControlSnapshot:
        """Parse and verify a snapshot for ``spec``.

        Raises:
            WireError: bad magic or layout, wrong length, hash mismatch, NaN or Inf.
            SpecMismatchError: made for another ParamSpec.
        """
        if len(data) < _SNAPSHOT_HEAD.size:
            raise WireError(f"control snapshot: {len(data)} bytes, shorter than its header")
        magic, layout, spec_raw, version, sha, count = _SNAPSHOT_HEAD.unpack(data[:_SNAPSHOT_HEAD.size])
        if magic != SNAPSHOT_MAGIC or layout != SNAPSHOT_LAYOUT:
            raise WireError(f"control snapshot: magic {magic!r} layout {layout}, expected {SNAPSHOT_MAGIC!r} "
                            f"{SNAPSHOT_LAYOUT}")
        if spec_raw.hex() != spec.hash:
            raise SpecMismatchError(f"control snapshot for ParamSpec {spec_raw.hex()}, the model has {spec.hash}")
        if count != spec.size or len(data) != _SNAPSHOT_HEAD.size + 4 * spec.size:
            raise WireError(f"control snapshot: {count} elements in {len(data)} bytes, expected {spec.size}")
        vec = np.frombuffer(data, dtype="<f4", offset=_SNAPSHOT_HEAD.size).astype(np.float32)
        if not np.isfinite(vec).all():
            raise WireError("control snapshot holds NaN or Inf")
        if params_sha256(vec) != sha.hex():
            raise WireError("control snapshot: SHA-256 of the values differs from its header")
        return cls(spec.hash, version, vec)


def zero_sha256(size: int) -> str:
    """Hash of version 0 (the zero vector of ``size`` elements)."""
    return params_sha256(np.zeros(size, dtype=np.float32))


def _wait_chain(link: Link, fed: str, version: int, timeout: float) -> ModelChain:
    topic = chain_topic(fed)
    inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
    end = time.monotonic() + timeout
    link.subscribe(topic, inbox=inbox, timeout=max(1.0, timeout))
    try:
        while (remaining := end - time.monotonic()) > 0:
            try:
                msg = inbox.get(timeout=remaining)
            except queue.Empty:
                break
            if msg.topic == topic and msg.payload:
                chain = ModelChain.from_bytes(msg.payload)
                if chain.latest >= version:
                    return chain
    finally:
        link.unsubscribe(topic)
        link.unroute(topic)
    raise TransferError(f"no control-variate chain naming version {version} on {topic} within {timeout:.0f} s")


def fetch_control(link: Link, fed: str, spec: ParamSpec, version: int, held: tuple[int, np.ndarray] | None,
                  timeout: float) -> np.ndarray:
    """The published server control variate of ``version``, float32 ``(spec.size,)``, from
    ``held`` (a version and its vector; None: version 0, the zero vector) through the control
    chain: the retained deltas when they reach ``version`` and cost less, else the snapshot and
    the deltas after it (:func:`fedmq.fl.downlink.choose_catch_up`); every step verified by hash.

    Raises:
        TransferError: no chain naming ``version``, nothing reaches it, or a blob did not
            arrive within ``timeout`` seconds. WireError / SpecMismatchError: a blob is
            malformed, or the result's hash differs from the chain's.
    """
    end = time.monotonic() + timeout
    chain = _wait_chain(link, fed, version, timeout)
    expected = chain.sha256_of(version)
    if expected is None:
        raise TransferError(f"the control chain (latest {chain.latest}) no longer names version {version}")
    start = held if held is not None and held[0] <= version else (0, np.zeros(spec.size, dtype=np.float32))
    if start[0] == version and params_sha256(start[1]) == expected:
        return start[1]
    plan = choose_catch_up(start[0], version, chain.delta_sizes(), chain.snapshot.version, chain.snapshot.size)
    if plan is None:
        raise TransferError(f"control variate version {version} cannot be reached from the chain")
    vec = start[1]
    if plan.snapshot is not None:
        blob = fetch_blob(link, snapshot_topic(fed, plan.snapshot), max(1.0, end - time.monotonic()))
        if blob.sha256 != chain.snapshot.blob_sha256:
            raise TransferError(f"control snapshot {plan.snapshot}: blob sha256 differs from the chain's")
        vec = ControlSnapshot.from_bytes(blob.data, spec).vector
    for v in plan.deltas:
        entry = chain.entry(v)
        assert entry is not None  # choose_catch_up only names retained deltas
        blob = fetch_blob(link, delta_topic(fed, v), max(1.0, end - time.monotonic()))
        if blob.sha256 != entry.blob_sha256:
            raise TransferError(f"control delta {v}: blob sha256 differs from the chain's")
        vec = DeltaBlob.from_bytes(blob.data).apply(vec, spec)
    if params_sha256(vec) != expected:
        raise WireError(f"control variate version {version}: hash after catching up differs from the chain's")
    return vec
