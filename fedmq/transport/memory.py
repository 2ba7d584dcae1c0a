"""An in-process bus with MQTT's semantics, for unit tests and the simulator (``memory://NAME``).

:class:`MemoryBus` is a broker in one Python process: topic filters with ``+`` and ``#``
(MQTT 5.0 spec 4.7), retained messages (a zero-length retained publish clears one; a
subscription gets the retained messages it matches), last wills (published when a link is
dropped without a clean close, or taken over by another link with the same client id), and
a maximum packet size (a publish above it is refused, as :class:`~fedmq.transport.link.MqttLink`
refuses it before a real broker would disconnect). Delivery is synchronous, reliable and
in order: it models a broker that never drops QoS 1 messages, so the simulator measures the
federated-learning code, not the network.

The bus counts what it carried (:attr:`MemoryBus.stats`): per client, bytes and messages
published and delivered (payload bytes), the way a packet capture on a broker's
connections would.

Buses are found by name (:func:`get_bus`), so a configuration's broker URL
``memory://sim`` reaches the same bus from the coordinator and from every edge agent in
the process.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections import Counter
from collections.abc import Iterable

from fedmq.errors import ConfigError, TransportError
from fedmq.transport.base import Message, Will, max_payload_for, publish_packet_size
from fedmq.transport.settings import BrokerSettings


def topic_matches(pattern: str, topic: str) -> bool:
    """True when ``topic`` matches the MQTT filter ``pattern`` (``+`` one level, ``#`` the rest)."""
    p, t = pattern.split("/"), topic.split("/")
    for i, level in enumerate(p):
        if level == "#":
            return True
        if i >= len(t) or (level != "+" and level != t[i]):
            return False
    return len(p) == len(t)


def _check_filter(pattern: str) -> None:
    levels = pattern.split("/")
    for i, level in enumerate(levels):
        if ("#" in level and (level != "#" or i != len(levels) - 1)) or ("+" in level and level != "+"):
            raise TransportError(f"invalid topic filter {pattern!r}")


class MemoryBus:
    """One in-process broker (see the module docstring).

    Args:
        name: its name in :func:`get_bus`'s registry ("" for an unregistered bus).
        max_packet: largest PUBLISH packet accepted (bytes), None for MQTT's own limit.

    Attributes:
        stats: ``Counter`` keyed by ``(client_id, "bytes_in"|"bytes_out"|"msgs_in"|"msgs_out")``.
    """

    def __init__(self, name: str = "", max_packet: int | None = None) -> None:
        self.name = name
        self.max_packet = max_packet
        self.stats: Counter[tuple[str, str]] = Counter()
        self._lock = threading.RLock()
        self._retained: dict[str, bytes] = {}
        self._clients: dict[str, MemoryLink] = {}

    def link(self, client_id: str = "", settings: BrokerSettings | None = None) -> MemoryLink:
        """A new, unconnected link to this bus."""
        return MemoryLink(self, settings or BrokerSettings(url=f"memory://{self.name or 'bus'}"), client_id)

    def retained(self, pattern: str = "#") -> dict[str, bytes]:
        """Retained messages whose topic matches ``pattern``: topic -> payload."""
        with self._lock:
            return {t: p for t, p in self._retained.items() if topic_matches(pattern, t)}

    def bytes_carried(self, client_id: str | None = None) -> int:
        """Payload bytes published plus delivered, for one client or all."""
        return sum(n for (c, kind), n in self.stats.items()
                   if kind in ("bytes_in", "bytes_out") and (client_id is None or c == client_id))

    # -- used by MemoryLink ------------------------------------------------------------------

    def _attach(self, link: MemoryLink) -> None:
        with self._lock:
            old = self._clients.get(link.client_id)
            self._clients[link.client_id] = link
        if old is not None and old is not link:
            old._kicked()

    def _detach(self, link: MemoryLink, will: Will | None) -> None:
        with self._lock:
            if self._clients.get(link.client_id) is link:
                del self._clients[link.client_id]
        if will is not None:
            self._publish(link.client_id, will.topic, will.payload, will.retain)

    def _publish(self, sender: str, topic: str, payload: bytes, retain: bool) -> None:
        with self._lock:
            if retain:
                if payload:
                    self._retained[topic] = payload
                else:
                    self._retained.pop(topic, None)
            self.stats[(sender, "bytes_in")] += len(payload)
            self.stats[(sender, "msgs_in")] += 1
            targets = list(self._clients.values())
        for link in targets:
            # Retain As Published, as MqttLink subscribes with MQTT 5.
            if link._deliver(topic, payload, retain):
                self.stats[(link.client_id, "bytes_out")] += len(payload)
                self.stats[(link.client_id, "msgs_out")] += 1

    def _send_retained(self, link: MemoryLink, patterns: list[str]) -> None:
        with self._lock:
            items = [(t, p) for t, p in self._retained.items() if any(topic_matches(f, t) for f in patterns)]
        for topic, payload in items:
            if link._deliver(topic, payload, True, patterns):
                self.stats[(link.client_id, "bytes_out")] += len(payload)
                self.stats[(link.client_id, "msgs_out")] += 1


class _Done:
    """Publish handle of the bus: delivery is synchronous, so it is done at once."""

    __slots__ = ("topic",)

    def __init__(self, topic: str) -> None:
        self.topic = topic

    def done(self) -> bool:
        return True

    def wait(self, timeout: float) -> None:
        return None


class MemoryLink:
    """A client of a :class:`MemoryBus`; implements :class:`fedmq.transport.base.Link`.

    Args:
        bus: the bus.
        settings: broker settings (its URL names the bus; ``max_chunk`` sets blob chunk sizes).
        client_id: client id; random when empty. A second link connecting with the same id
            takes over: the first is dropped and its last will published, as a broker does.
    """

    _ids = itertools.count(1)

    def __init__(self, bus: MemoryBus, settings: BrokerSettings, client_id: str = "") -> None:
        self.bus = bus
        self.settings = settings
        self.client_id = client_id or f"memory-{next(self._ids)}"
        self.inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self.connects = 0
        self.disconnects = 0
        #: Drops because another link connected with this client id (the bus says so: no
        #: drop is ever merely short-lived).
        self.taken_over = 0
        self.short_lived = 0
        self._lock = threading.Lock()
        self._connected = False
        self._will: Will | None = None
        self._subs: dict[str, int] = {}
        self._routes: dict[str, queue.SimpleQueue[Message]] = {}

    @property
    def connected(self) -> bool:
        return self._connected

    def set_will(self, will: Will | None) -> None:
        self._will = will

    def connect(self, timeout: float | None = None) -> MemoryLink:
        with self._lock:
            if self._connected:
                return self
            self._connected = True
            self.connects += 1
        self.bus._attach(self)
        if self._subs:
            self.bus._send_retained(self, list(self._subs))
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Disconnect cleanly: the last will is not published."""
        self._disconnect(None)

    def drop(self) -> None:
        """Disconnect uncleanly (as a crash or a lost network would): the last will is published."""
        self._disconnect(self._will)

    def _disconnect(self, will: Will | None) -> None:
        with self._lock:
            if not self._connected:
                return
            self._connected = False
            self.disconnects += 1
        self.bus._detach(self, will)

    def _kicked(self) -> None:
        with self._lock:
            if not self._connected:
                return
            self._connected = False
            self.disconnects += 1
            self.taken_over += 1
        will = self._will
        if will is not None:
            self.bus._publish(self.client_id, will.topic, will.payload, will.retain)

    def __enter__(self) -> MemoryLink:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def max_payload(self, topic: str, qos: int = 1) -> int:
        return max_payload_for(topic, self.bus.max_packet, qos=qos, protocol=self.settings.protocol)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> _Done:
        """Deliver at once to every matching subscription.

        Raises:
            TransportError: not connected, a wildcard in the topic, or the packet exceeds the
                bus's maximum packet size.
        """
        if "+" in topic or "#" in topic:
            raise TransportError(f"publish to {topic!r}: wildcards are not allowed in a topic name")
        limit = self.bus.max_packet
        size = publish_packet_size(topic, len(payload), qos=qos, protocol=self.settings.protocol)
        if limit is not None and size > limit:
            raise TransportError(f"publish to {topic!r}: packet of {size} bytes exceeds the broker's maximum "
                                 f"packet size {limit} bytes; send it as a chunked blob")
        if not self._connected:
            raise TransportError(f"publish to {topic!r}: client {self.client_id!r} is not connected to "
                                 f"{self.settings.url}")
        self.bus._publish(self.client_id, topic, bytes(payload), retain)
        return _Done(topic)

    def publish_wait(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                     timeout: float = 30.0) -> None:
        self.publish(topic, payload, qos=qos, retain=retain)

    def flush(self, timeout: float) -> bool:
        """Nothing to wait for: :meth:`publish` delivers at once. Returns True."""
        return True

    def route(self, pattern: str, inbox: queue.SimpleQueue[Message]) -> None:
        with self._lock:
            self._routes[pattern] = inbox

    def unroute(self, pattern: str) -> None:
        with self._lock:
            self._routes.pop(pattern, None)

    def subscribe(self, filters: str | Iterable[str], *, qos: int = 1,
                  inbox: queue.SimpleQueue[Message] | None = None, timeout: float = 10.0) -> None:
        """Subscribe; the retained messages the filters match are delivered at once.

        Raises:
            TransportError: an invalid filter, or not connected.
        """
        items = [filters] if isinstance(filters, str) else list(filters)
        for f in items:
            _check_filter(f)
        with self._lock:
            for f in items:
                self._subs[f] = qos
                if inbox is not None:
                    self._routes[f] = inbox
        if not self._connected:
            raise TransportError(f"subscribe {items[:3]}: not connected to {self.settings.url}")
        self.bus._send_retained(self, items)

    def unsubscribe(self, filters: str | Iterable[str]) -> None:
        items = [filters] if isinstance(filters, str) else list(filters)
        with self._lock:
            for f in items:
                self._subs.pop(f, None)

    def _deliver(self, topic: str, payload: bytes, retain: bool, only: list[str] | None = None) -> bool:
        """Queue one message if a subscription (of ``only``, when given) matches; True if queued."""
        with self._lock:
            if not self._connected:
                return False
            subs = only if only is not None else list(self._subs)
            if not any(topic_matches(f, topic) for f in subs):
                return False
            queues = [q for p, q in self._routes.items() if topic_matches(p, topic)]
        msg = Message(topic, payload, retain)
        for q in queues or [self.inbox]:
            q.put(msg)
        return True


_BUSES: dict[str, MemoryBus] = {}
_BUSES_LOCK = threading.Lock()


def get_bus(name: str, *, max_packet: int | None = None) -> MemoryBus:
    """The bus called ``name`` (created on first use, with ``max_packet`` if given then)."""
    with _BUSES_LOCK:
        bus = _BUSES.get(name)
        if bus is None:
            bus = _BUSES[name] = MemoryBus(name, max_packet)
        return bus


def drop_bus(name: str) -> None:
    """Forget the bus called ``name`` (its links keep working until closed)."""
    with _BUSES_LOCK:
        _BUSES.pop(name, None)


def memory_link(settings: BrokerSettings, client_id: str = "") -> MemoryLink:
    """Link factory for ``memory://NAME`` URLs (registered in :mod:`fedmq.transport`).

    Raises:
        ConfigError: the URL names no bus.
    """
    name = settings.url.split("://", 1)[1].strip("/") if "://" in settings.url else ""
    if not name:
        raise ConfigError(f"broker url {settings.url!r}: expected memory://NAME")
    return get_bus(name).link(client_id, settings)
