"""A link that counts the payload bytes it carries, in each direction.

:class:`CountingLink` wraps any :class:`~fedmq.transport.base.Link` (MQTT or the in-memory
bus) and counts the payload bytes and messages of every publish it makes and of every
message the broker delivers to it (default inbox, routed inboxes and subscriptions with
their own inbox alike): what this connection really carried, not an estimate. MQTT fixed
and variable headers (topic, packet id, properties) are not counted; a packet capture
would add about ``len(topic) + 4`` bytes per message.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable
from typing import Any

from fedmq.transport.base import Link, Message

#: Client-update metric: payload bytes delivered to the device's link since its previous update.
LINK_BYTES_IN = "link_bytes_in"
#: Client-update metric: payload bytes the device published since its previous update.
LINK_BYTES_OUT = "link_bytes_out"


class Traffic:
    """Thread-safe counters: ``bytes_in`` / ``msgs_in`` (delivered to this link) and
    ``bytes_out`` / ``msgs_out`` (published by it), payload bytes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.bytes_in = self.bytes_out = self.msgs_in = self.msgs_out = 0

    def received(self, n: int) -> None:
        with self._lock:
            self.bytes_in += n
            self.msgs_in += 1

    def sent(self, n: int) -> None:
        with self._lock:
            self.bytes_out += n
            self.msgs_out += 1

    def snapshot(self) -> dict[str, int]:
        """The four counters at one instant."""
        with self._lock:
            return {"bytes_in": self.bytes_in, "bytes_out": self.bytes_out, "msgs_in": self.msgs_in,
                    "msgs_out": self.msgs_out}


class _CountingQueue(queue.SimpleQueue):  # type: ignore[type-arg]
    """Counts each message put into it, then keeps it (``target`` None) or forwards it."""

    def __init__(self, traffic: Traffic, target: queue.SimpleQueue[Message] | None = None) -> None:
        super().__init__()
        self._traffic = traffic
        self._target = target

    def put(self, item: Message, block: bool = True, timeout: float | None = None) -> None:
        self._traffic.received(len(item.payload))
        if self._target is None:
            super().put(item, block, timeout)
        else:
            self._target.put(item)


class CountingLink:
    """``link`` with :attr:`traffic` counters; every other attribute is the wrapped link's.

    Wrap before the first subscription: the wrapped link's default inbox is replaced by a
    counting one. ``traffic``: counters to add to (default: new ones), e.g. those of the
    link this one replaces after a reconnect with a new connection.
    """

    def __init__(self, link: Link, traffic: Traffic | None = None) -> None:
        self._link = link
        self.traffic = traffic if traffic is not None else Traffic()
        link.inbox = _CountingQueue(self.traffic)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._link, name)

    @property
    def inbox(self) -> queue.SimpleQueue[Message]:
        return self._link.inbox

    def __enter__(self) -> CountingLink:
        self._link.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self._link.close()

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> Any:
        handle = self._link.publish(topic, payload, qos=qos, retain=retain)
        self.traffic.sent(len(payload))
        return handle

    def publish_wait(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                     timeout: float = 30.0) -> None:
        self._link.publish_wait(topic, payload, qos=qos, retain=retain, timeout=timeout)
        self.traffic.sent(len(payload))

    def route(self, pattern: str, inbox: queue.SimpleQueue[Message]) -> None:
        self._link.route(pattern, _CountingQueue(self.traffic, inbox))

    def subscribe(self, filters: str | Iterable[str], *, qos: int = 1,
                  inbox: queue.SimpleQueue[Message] | None = None, timeout: float = 10.0) -> None:
        routed = None if inbox is None else _CountingQueue(self.traffic, inbox)
        self._link.subscribe(filters, qos=qos, inbox=routed, timeout=timeout)
