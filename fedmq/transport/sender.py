"""Sending side of chunked blob transfers: manifest then chunks, paced by a window of
unacknowledged QoS 1 publishes, and resend on request."""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass

from fedmq.wire import topics
from fedmq.errors import TransferError
from fedmq.transport.link import MqttLink, Publish
from fedmq.transport.wire import CHUNK_HEADER, Manifest, TransferRequest, pack_chunk

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BlobInfo:
    """What was sent: base topic, transfer id (32 hex chars), size (bytes), number of
    chunk messages (0 = inline in the manifest), chunk size (bytes), SHA-256 (hex)."""

    base: str
    transfer_id: str
    size: int
    count: int
    chunk_size: int
    sha256: str


class BlobSender:
    """Publish blobs as manifest + chunks under a base topic (QoS 1).

    A blob that fits in one chunk travels inline in the manifest (one message). At most
    ``window`` chunk publishes are unacknowledged by the broker at any time, which bounds
    what paho holds in memory and paces the sender to the broker. The last ``keep``
    non-retained transfers are kept so that :meth:`resend` can repair them until
    :meth:`acknowledge` (e.g. on the coordinator's receipt).

    Args:
        link: a connected :class:`MqttLink`.
        chunk_size: largest chunk payload, bytes (``link.settings.max_chunk`` when None);
            capped so that each chunk packet fits the broker's Maximum Packet Size.
        window: most unacknowledged chunk publishes (default 16).
        keep: non-retained transfers kept for resend (default 4).
    """

    def __init__(self, link: MqttLink, *, chunk_size: int | None = None, window: int = 16, keep: int = 4) -> None:
        self.link = link
        self.chunk_size = int(chunk_size or link.settings.max_chunk)
        if self.chunk_size < 1024 or window < 1 or keep < 0:
            raise ValueError("chunk_size >= 1024 bytes, window >= 1, keep >= 0 expected")
        self.window = window
        self.keep = keep
        self._kept: OrderedDict[str, tuple[Manifest, bytes]] = OrderedDict()

    def effective_chunk_size(self, base: str) -> int:
        """Chunk payload size used under ``base``: the configured size, capped by the
        broker's Maximum Packet Size minus the packet and chunk headers (bytes)."""
        worst_topic = topics.blob_chunk(base, 10**9)
        return max(1, min(self.chunk_size, self.link.max_payload(worst_topic) - CHUNK_HEADER.size))

    def send(self, base: str, data: bytes, *, retain: bool = False, timeout: float = 60.0,
             round_: int | None = None) -> BlobInfo:
        """Publish ``data`` under ``base`` and wait until the broker acknowledged every message.

        The broker's PUBACK is not delivery to subscribers (a broker drops QoS 1 messages
        for slow subscribers): receivers detect gaps and repair them (retained: subscribe
        again; non-retained: a :class:`TransferRequest` answered by :meth:`resend`).

        Args:
            base: base topic (e.g. ``topics.model_blob(F, V)`` or ``topics.update_base(F, D, T)``).
            data: the blob (any size up to 2 GiB).
            retain: publish manifest and chunks as retained messages (global model).
            timeout: seconds for the whole transfer, reconnects included.
            round_: for a client update, the round it answers, written into the manifest
                (:attr:`fedmq.transport.wire.Manifest.round`).

        Raises:
            TransportError: not acknowledged in time, or refused by the broker.
            TransferError: the manifest does not fit in one packet under the broker's limit.
        """
        data = bytes(data)
        chunk = self.effective_chunk_size(base)
        inline = len(data) <= chunk
        manifest = Manifest.build(os.urandom(16), data, chunk, inline=inline, round_=round_)
        body = manifest.to_bytes()
        if len(body) > self.link.max_payload(topics.blob_manifest(base)):
            raise TransferError(f"blob {base!r}: manifest of {len(body)} bytes ({manifest.count} chunks) exceeds the "
                                f"broker's packet limit; raise max_chunk or the broker's max_packet_size")
        if not retain and self.keep:
            self._kept[base] = (manifest, data)
            self._kept.move_to_end(base)
            while len(self._kept) > self.keep:
                self._kept.popitem(last=False)
        self._publish(base, manifest, body, data, range(manifest.count), retain, timeout)
        return BlobInfo(base, manifest.id_hex, manifest.size, manifest.count, manifest.chunk_size,
                        manifest.sha256.hex())

    def _publish(self, base: str, manifest: Manifest, body: bytes | None, data: bytes, indices: Iterable[int],
                 retain: bool, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        pending: deque[Publish] = deque()
        link = self.link
        if body is not None:
            pending.append(link.publish(topics.blob_manifest(base), body, retain=retain))
        view = memoryview(data)
        size = manifest.chunk_size
        sent = 0
        for i in indices:
            while len(pending) >= self.window:
                pending.popleft().wait(max(0.0, deadline - time.monotonic()))
            payload = pack_chunk(manifest.transfer_id, i, view[i * size:(i + 1) * size])
            pending.append(link.publish(topics.blob_chunk(base, i), payload, retain=retain))
            sent += 1
        while pending:
            pending.popleft().wait(max(0.0, deadline - time.monotonic()))
        return sent

    def kept(self) -> list[str]:
        """Base topics of the transfers kept for resend, oldest first."""
        return list(self._kept)

    def acknowledge(self, base: str) -> None:
        """Forget a kept transfer (its receiver confirmed it)."""
        self._kept.pop(base, None)

    def resend(self, base: str, indices: Iterable[int] | None = None, *, timeout: float = 60.0) -> int:
        """Publish again chunks of a kept non-retained transfer; ``indices`` None or empty
        means the manifest and every chunk. Indices out of range are ignored.

        Returns:
            the number of chunks published.

        Raises:
            TransferError: nothing is kept for ``base`` (acknowledged, or pushed out by
                ``keep`` newer transfers): send it again with :meth:`send`.
            TransportError: not acknowledged within ``timeout`` seconds.
        """
        try:
            manifest, data = self._kept[base]
        except KeyError:
            raise TransferError(f"blob {base!r}: no kept transfer to resend") from None
        wanted = sorted({i for i in indices or () if 0 <= i < manifest.count})
        if not wanted:
            return self._publish(base, manifest, manifest.to_bytes(), data, range(manifest.count), False, timeout)
        return self._publish(base, manifest, None, data, wanted, False, timeout)

    def handle_request(self, request: TransferRequest | bytes, *, timeout: float = 60.0) -> int:
        """Answer a :class:`TransferRequest` (or its bytes) from the receiver.

        Returns the number of chunks published; 0 when the request names a transfer that
        is no longer kept or was superseded (the receiver will drop it by timeout, and the
        sender's own retry sends it again).

        Raises:
            WireError: ``request`` bytes are malformed. TransportError: as :meth:`resend`.
        """
        if not isinstance(request, TransferRequest):
            request = TransferRequest.from_bytes(request)
        kept = self._kept.get(request.base)
        if kept is None or kept[0].transfer_id != request.transfer_id:
            log.info("transfer request for %s (%s) ignored: not kept", request.base, request.transfer_id.hex())
            return 0
        return self.resend(request.base, request.chunks, timeout=timeout)
