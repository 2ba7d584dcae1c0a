"""High-level blob flows built on the link, sender and receiver: publish and fetch a
retained global model, clear a superseded version, ask senders of client updates to
repair stalled transfers."""

from __future__ import annotations

import hashlib
import logging
import queue
import time
from collections import deque
from collections.abc import Iterable

from fedmq.wire import topics
from fedmq.errors import TransferError, WireError
from fedmq.wire.messages import ModelPointer
from fedmq.transport.link import Message, MqttLink, Publish
from fedmq.transport.receiver import BlobReceiver, CompletedBlob
from fedmq.transport.sender import BlobInfo, BlobSender
from fedmq.transport.wire import Manifest, TransferRequest

log = logging.getLogger(__name__)

#: Topic filters per SUBSCRIBE packet when asking for individual chunks again.
_SUBSCRIBE_BATCH = 256
_KINDS = {"model": (topics.model_blob, topics.model_latest), "onnx": (topics.onnx_blob, topics.onnx_latest)}


def _kind(kind: str):  # noqa: ANN202 - pair of topic builders
    try:
        return _KINDS[kind]
    except KeyError:
        raise TransferError(f"model kind {kind!r} unknown, expected one of {sorted(_KINDS)}") from None


def publish_model(link: MqttLink, fed: str, version: int, data: bytes, pointer: ModelPointer, *,
                  kind: str = "model", supersede: int | None = None, chunk_size: int | None = None,
                  timeout: float = 120.0) -> BlobInfo:
    """Publish global model ``version`` as a retained blob, then move the retained pointer
    (``topics.model_latest``) to it, then clear the retained blob of version ``supersede``.

    Devices that join later get the pointer and fetch the blob from the retained copies
    (:func:`fetch_model`). The pointer moves only once every chunk is on the broker.

    Args:
        data: the serialised model (bytes).
        pointer: its :class:`ModelPointer`; version, size and sha256 must describe ``data``.
        kind: ``"model"`` (topics.model_*) or ``"onnx"`` (topics.onnx_*).
        supersede: previous version whose retained blob is cleared afterwards (None: keep).
        chunk_size: chunk payload bytes (link settings' max_chunk when None).
        timeout: seconds for the whole publication.

    Raises:
        TransferError: ``pointer`` does not describe ``data``. TransportError: the broker did
            not acknowledge in time.
    """
    blob_topic, latest_topic = _kind(kind)
    digest = hashlib.sha256(data).hexdigest()
    if (pointer.version, pointer.size, pointer.sha256) != (version, len(data), digest):
        raise TransferError(f"model pointer (version {pointer.version}, {pointer.size} bytes, sha256 "
                            f"{pointer.sha256[:12]}) does not describe version {version} ({len(data)} bytes, "
                            f"sha256 {digest[:12]})")
    deadline = time.monotonic() + timeout
    info = BlobSender(link, chunk_size=chunk_size).send(blob_topic(fed, version), data, retain=True, timeout=timeout)
    link.publish_wait(latest_topic(fed), pointer.to_bytes(), retain=True,
                      timeout=max(1.0, deadline - time.monotonic()))
    if supersede is not None and supersede != version:
        clear_blob(link, blob_topic(fed, supersede), timeout=max(1.0, deadline - time.monotonic()))
    return info


def _publish_all(link: MqttLink, items: Iterable[tuple[str, bytes]], *, retain: bool, timeout: float,
                 window: int = 32) -> int:
    deadline = time.monotonic() + timeout
    pending: deque[Publish] = deque()
    n = 0
    for topic, payload in items:
        while len(pending) >= window:
            pending.popleft().wait(max(0.0, deadline - time.monotonic()))
        pending.append(link.publish(topic, payload, retain=retain))
        n += 1
    while pending:
        pending.popleft().wait(max(0.0, deadline - time.monotonic()))
    return n


def _retained(link: MqttLink, topic: str, timeout: float) -> bytes | None:
    """The retained message on ``topic`` (None if there is none after ``timeout`` seconds)."""
    inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
    link.subscribe(topic, inbox=inbox, timeout=timeout)
    try:
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                msg = inbox.get(timeout=remaining)
            except queue.Empty:
                return None
            if msg.topic == topic and msg.payload:
                return msg.payload
        return None
    finally:
        link.unsubscribe(topic)
        link.unroute(topic)


def clear_blob(link: MqttLink, base: str, count: int | None = None, *, timeout: float = 30.0,
               lookup: float = 2.0) -> int:
    """Clear a retained blob (zero-length retained publishes on its manifest and chunks).

    Args:
        count: number of chunks; when None it is read from the retained manifest (waiting
            up to ``lookup`` seconds for it; no manifest means nothing but the manifest
            topic is cleared).
        timeout: seconds for the publishes to be acknowledged.

    Returns:
        the number of chunk topics cleared.

    Raises:
        TransportError: not acknowledged in time.
    """
    if count is None:
        body = _retained(link, topics.blob_manifest(base), lookup)
        count = 0
        if body is not None:
            try:
                count = Manifest.from_bytes(body).count
            except WireError as exc:
                log.warning("retained manifest of %s unreadable (%s): clearing the manifest only", base, exc)
    items = [(topics.blob_manifest(base), b"")] + [(topics.blob_chunk(base, i), b"") for i in range(count)]
    _publish_all(link, items, retain=True, timeout=timeout)
    return count


def fetch_blob(link: MqttLink, base: str, timeout: float = 120.0, *, receiver: BlobReceiver | None = None,
               refetch_after: float = 2.0) -> CompletedBlob:
    """Download a retained blob: subscribe to its manifest, then to the chunks it lacks.

    Chunks that do not arrive (dropped by the broker for a slow subscriber, corrupt, or
    lost in a reconnect) are asked for again by subscribing again to their topics, which
    makes the broker send the retained copies again, after ``refetch_after`` seconds
    without progress. With a ``receiver`` that has a spool folder, a fetch cut short by a
    restart resumes: only the chunks the spool lacks are downloaded.

    Args:
        base: base topic of the blob (e.g. ``topics.model_blob(F, V)``).
        timeout: seconds for the whole download.
        receiver: reassembles the blob (a memory-only one when None).
        refetch_after: seconds without progress before asking again.

    Returns:
        the verified blob.

    Raises:
        TransferError: not complete within ``timeout`` (the message says how far it got).
        TransportError: the link is down and subscriptions could not be made.
    """
    rx = receiver if receiver is not None else BlobReceiver(timeout=max(timeout, 60.0))
    inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
    pattern = f"{base}/#"
    manifest_topic = topics.blob_manifest(base)
    subscribed: list[str] = []
    deadline = time.monotonic() + timeout
    link.route(pattern, inbox)

    def subscribe(filters: list[str]) -> None:
        for start in range(0, len(filters), _SUBSCRIBE_BATCH):
            batch = filters[start:start + _SUBSCRIBE_BATCH]
            link.subscribe(batch, timeout=max(1.0, deadline - time.monotonic()))
            subscribed.extend(f for f in batch if f not in subscribed)

    try:
        subscribe([manifest_topic])
        asked_chunks = False
        last_progress = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= deadline:
                missing = rx.missing(base)
                got = "no manifest" if missing is None else f"{len(missing)} chunk(s) missing"
                raise TransferError(f"blob {base!r} not complete within {timeout:.0f} s ({got}; "
                                    f"broker {link.settings.url})")
            try:
                msg = inbox.get(timeout=min(deadline - now, refetch_after))
            except queue.Empty:
                msg = None
            if msg is not None:
                done = rx.feed(msg.topic, msg.payload)
                if done is not None and done.base == base:
                    return done
                last_progress = time.monotonic()
            manifest = rx.manifest(base)
            if manifest is not None and not asked_chunks:
                missing = rx.missing(base) or []
                if len(missing) == manifest.count:
                    subscribe([f"{base}/c/+"])
                else:
                    subscribe([topics.blob_chunk(base, i) for i in missing])
                asked_chunks = True
                last_progress = time.monotonic()
            elif time.monotonic() - last_progress >= refetch_after:
                if manifest is None:
                    subscribe([manifest_topic])
                    asked_chunks = False
                else:
                    missing = rx.missing(base) or []
                    log.info("blob %s: %d chunk(s) still missing, asking the broker again", base, len(missing))
                    subscribe([topics.blob_chunk(base, i) for i in missing])
                last_progress = time.monotonic()
    finally:
        link.unroute(pattern)
        if subscribed:
            link.unsubscribe(subscribed)


def fetch_model(link: MqttLink, fed: str, *, kind: str = "model", receiver: BlobReceiver | None = None,
                timeout: float = 120.0) -> tuple[ModelPointer, CompletedBlob]:
    """Read the retained model pointer, then download the blob it names (:func:`fetch_blob`).

    Raises:
        TransferError: no pointer within ``timeout``, or the blob does not match the
            pointer's size and SHA-256, or not complete in time. WireError: bad pointer.
    """
    blob_topic, latest_topic = _kind(kind)
    deadline = time.monotonic() + timeout
    body = _retained(link, latest_topic(fed), timeout)
    if body is None:
        raise TransferError(f"no retained model pointer on {latest_topic(fed)!r} within {timeout:.0f} s")
    pointer = ModelPointer.from_bytes(body)
    blob = fetch_blob(link, blob_topic(fed, pointer.version), max(1.0, deadline - time.monotonic()),
                      receiver=receiver)
    if blob.sha256 != pointer.sha256 or len(blob.data) != pointer.size:
        raise TransferError(f"model version {pointer.version}: blob ({len(blob.data)} bytes, sha256 "
                            f"{blob.sha256[:12]}) does not match its pointer ({pointer.size} bytes, "
                            f"{pointer.sha256[:12]})")
    return pointer, blob


def request_repairs(link: MqttLink, fed: str, receiver: BlobReceiver, idle: float = 2.0) -> int:
    """Ask devices to resend the missing chunks of client-update transfers that made no
    progress for ``idle`` seconds (a :class:`TransferRequest` on
    ``topics.transfer_requests(F, D)``; the device answers with ``BlobSender.handle_request``).
    Call it periodically from the coordinator's ingest loop. Returns the number of requests.

    A transfer whose manifest never arrived is unknown here: the device sends it again
    when no receipt comes before its own timeout.
    """
    n = 0
    for stalled in receiver.stalled(idle):
        device = topics.device_of_update(fed, stalled.base)
        if device is None:
            continue
        request = TransferRequest(stalled.base, stalled.transfer_id, stalled.missing)
        link.publish(topics.transfer_requests(fed, device), request.to_bytes())
        n += 1
    return n
