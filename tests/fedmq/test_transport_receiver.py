"""BlobReceiver, Manifest and TransferRequest without a broker: reassembly in any order,
integrity checks, bad input, expiry, spool and resume."""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import replace

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmq.wire import topics
from fedmq.errors import WireError
from fedmq.transport import BlobReceiver, Manifest, TransferRequest
from fedmq.transport.wire import pack_chunk

BASE = topics.update_base("f", "dev1", "t1")


def messages(data: bytes, chunk: int, tid: bytes = b"\x07" * 16) -> tuple[tuple[str, bytes], list[tuple[str, bytes]]]:
    manifest = Manifest.build(tid, data, chunk, inline=False)
    chunks = [(topics.blob_chunk(BASE, i), pack_chunk(tid, i, data[i * chunk:(i + 1) * chunk]))
              for i in range(manifest.count)]
    return (topics.blob_manifest(BASE), manifest.to_bytes()), chunks


def feed_all(rx: BlobReceiver, items) -> list:
    return [blob for topic, payload in items if (blob := rx.feed(topic, payload)) is not None]


@settings(max_examples=40, deadline=None)
@given(size=st.integers(0, 5000), chunk=st.integers(1, 700), seed=st.integers(0, 2**32 - 1),
       manifest_at=st.floats(0, 1), dup=st.integers(0, 5))
def test_any_order_with_duplicates_gives_the_blob_once(size, chunk, seed, manifest_at, dup):
    rng = random.Random(seed)
    data = rng.randbytes(size)
    manifest, chunks = messages(data, chunk)
    items = chunks + [rng.choice(chunks) for _ in range(dup if chunks else 0)]
    rng.shuffle(items)
    items.insert(int(manifest_at * len(items)), manifest)
    rx = BlobReceiver(timeout=60)
    blobs = feed_all(rx, items)
    assert len(blobs) == 1
    blobs += feed_all(rx, [manifest] + chunks[:dup])  # duplicates after completion
    assert len(blobs) == 1 and blobs[0].data == data and blobs[0].sha256 == hashlib.sha256(data).hexdigest()
    assert rx.pending() == []


def test_inline_manifest_is_one_message():
    data = b"small update"
    manifest = Manifest.build(b"\x01" * 16, data, 1024, inline=True)
    rx = BlobReceiver()
    blob = rx.feed(topics.blob_manifest(BASE), manifest.to_bytes())
    assert blob is not None and blob.data == data and blob.transfer_id == "01" * 16
    assert rx.feed(topics.blob_manifest(BASE), manifest.to_bytes()) is None
    assert rx.stats["duplicate_manifests"] == 1


def test_corrupt_chunk_is_detected_and_repaired():
    data = os.urandom(10_000)
    manifest, chunks = messages(data, 1000)
    rx = BlobReceiver()
    rx.feed(*manifest)
    topic, payload = chunks[3]
    assert rx.feed(topic, payload[:-1] + bytes([payload[-1] ^ 0x40])) is None
    assert rx.stats["corrupt_chunks"] == 1
    assert feed_all(rx, chunks[:3] + chunks[4:]) == []
    assert rx.missing(BASE) == [3]
    assert rx.stalled(0.0)[0].missing == (3,)
    blob = rx.feed(topic, payload)
    assert blob is not None and blob.data == data


def test_blob_failing_sha256_is_never_delivered():
    data = os.urandom(5000)
    manifest = Manifest.build(b"\x02" * 16, data, 1000, inline=False)
    lying = replace(manifest, sha256=hashlib.sha256(b"other").digest())
    rx = BlobReceiver()
    rx.feed(topics.blob_manifest(BASE), lying.to_bytes())
    assert feed_all(rx, [(topics.blob_chunk(BASE, i), pack_chunk(manifest.transfer_id, i, data[i * 1000:(i + 1) * 1000]))
                         for i in range(5)]) == []
    assert rx.stats["hash_mismatch"] == 1 and rx.pending() == []


@pytest.mark.parametrize(("topic", "payload"), [
    (topics.blob_manifest(BASE), b"\xc1garbage"),
    (topics.blob_manifest(BASE), msgpack.packb({"v": 1, "type": "blob_manifest"})),
    (topics.blob_manifest(BASE), msgpack.packb([1, 2, 3])),
    (topics.blob_chunk(BASE, 0), b"short"),
    (topics.blob_chunk(BASE, 0), b"XXXX" + bytes(20) + b"data"),
    (topics.blob_chunk(BASE, 1), pack_chunk(b"\x07" * 16, 2, b"data")),
    (BASE + "/other", b"x"),
])
def test_bad_messages_are_counted_not_raised(topic, payload):
    rx = BlobReceiver()
    assert rx.feed(topic, payload) is None
    assert rx.stats["bad_messages"] == 1


def test_manifest_decoding_is_strict():
    good = Manifest.build(b"\x03" * 16, os.urandom(3000), 1000, inline=False)
    assert Manifest.from_bytes(good.to_bytes()) == good
    for bad in (replace(good, count=2), replace(good, crcs=good.crcs[:-1]), replace(good, transfer_id=b"x"),
                replace(good, chunk_size=0), replace(good, inline=b"abc")):
        with pytest.raises(WireError):
            Manifest.from_bytes(bad.to_bytes())
    with pytest.raises(WireError, match="exceeds"):
        Manifest.from_bytes(good.to_bytes(), max_size=100)


def test_transfer_request_decoding_is_strict():
    request = TransferRequest(BASE, b"\x04" * 16, (1, 9))
    assert TransferRequest.from_bytes(request.to_bytes()) == request
    for bad in (b"", msgpack.packb({"v": 1, "type": "transfer_request", "base": BASE, "id": b"x"}),
                msgpack.packb({"v": 1, "type": "transfer_request", "base": BASE, "id": b"\x04" * 16, "chunks": [-1]}),
                msgpack.packb({"v": 2, "type": "transfer_request", "base": BASE, "id": b"\x04" * 16})):
        with pytest.raises(WireError):
            TransferRequest.from_bytes(bad)


def test_idle_transfer_expires_and_early_chunks_are_bounded():
    now = [0.0]
    rx = BlobReceiver(timeout=10, early_limit=2500, clock=lambda: now[0])
    manifest, chunks = messages(os.urandom(8000), 1000)
    assert feed_all(rx, chunks[:5]) == []  # before their manifest: only two fit in 2500 bytes
    assert rx.stats["early_dropped"] == 3
    rx.feed(*manifest)
    assert len(rx.missing(BASE)) == 6
    now[0] = 5.0
    assert rx.expire() == []
    now[0] = 16.0
    assert rx.expire() == [BASE] and rx.stats["expired"] == 1
    assert rx.missing(BASE) is None


def test_new_transfer_supersedes_the_old_one_under_the_same_base():
    rx = BlobReceiver()
    old_manifest, old_chunks = messages(os.urandom(3000), 1000, tid=b"\x05" * 16)
    new_data = os.urandom(3000)
    new_manifest, new_chunks = messages(new_data, 1000, tid=b"\x06" * 16)
    rx.feed(*old_manifest)
    rx.feed(*old_chunks[0])
    rx.feed(*new_manifest)
    assert rx.stats["superseded"] == 1
    assert feed_all(rx, old_chunks[1:]) == []
    blobs = feed_all(rx, new_chunks)
    assert len(blobs) == 1 and blobs[0].data == new_data


def test_spooled_transfer_resumes_after_a_restart(tmp_path):
    data = os.urandom(50_000)
    manifest, chunks = messages(data, 4096)
    rx = BlobReceiver(tmp_path, spool_threshold=10_000)
    rx.feed(*manifest)
    feed_all(rx, chunks[::2])
    assert len(list(tmp_path.glob("*.part"))) == 1
    rx.close()
    resumed = BlobReceiver(tmp_path, spool_threshold=10_000)
    assert resumed.stats["resumed_chunks"] == len(chunks[::2])
    assert resumed.missing(BASE) == list(range(1, len(chunks), 2))
    blobs = feed_all(resumed, chunks[1::2])
    assert len(blobs) == 1 and blobs[0].data == data
    assert list(tmp_path.iterdir()) == []


def test_fully_spooled_transfer_completes_on_its_manifest_after_restart(tmp_path):
    data = os.urandom(30_000)
    manifest, chunks = messages(data, 4096)
    rx = BlobReceiver(tmp_path, spool_threshold=1000)
    rx.feed(*manifest)
    feed_all(rx, chunks[:-1])
    # Crash after the last chunk reached the file but before the blob was handed over.
    last = chunks[-1][1][24:]
    rx.spool.write(rx._transfers[BASE].key, (len(chunks) - 1) * 4096, last)
    rx.close()
    resumed = BlobReceiver(tmp_path, spool_threshold=1000)
    assert resumed.missing(BASE) == []
    blob = resumed.feed(*manifest)
    assert blob is not None and blob.data == data


def test_unreadable_spool_entry_is_removed(tmp_path):
    (tmp_path / "abc.meta").write_bytes(b"\xc1 not msgpack")
    (tmp_path / "abc.part").write_bytes(b"junk")
    rx = BlobReceiver(tmp_path)
    assert rx.pending() == [] and list(tmp_path.iterdir()) == []


def test_the_piecewise_sha256_is_hashlibs_digest() -> None:
    """Blobs under 256 KiB are hashed in 2,047-byte pieces (keeping the GIL), larger ones in
    one call: the digest is SHA-256's either way, at every piece boundary."""
    import hashlib
    import os

    from fedmq.transport.receiver import _sha256

    for size in (0, 1, 2046, 2047, 2048, 4094, 4095, 35295, 256 * 1024 - 1, 256 * 1024, 300_000):
        data = os.urandom(size)
        assert _sha256(data) == hashlib.sha256(data).digest(), size
        assert _sha256(memoryview(data)) == hashlib.sha256(data).digest(), size
