"""The link seam: what the coordinator, the edge agent and the blob transfers need from a broker
connection, and the registry that picks an implementation by the broker URL's scheme.

Implementations: :class:`fedmq.transport.link.MqttLink` (``mqtt://``, ``mqtts://``: a real
broker through paho-mqtt) and :class:`fedmq.transport.memory.MemoryLink` (``memory://NAME``:
an in-process bus for unit tests and the simulator, with MQTT's topic filters, retained
messages, last wills and a maximum packet size). A new link is one module plus one
:func:`register_link` line (``fedmq/transport/__init__.py`` registers the built-in ones).

Contract (every implementation):

* received messages go to :attr:`Link.inbox`, or to the queue a filter was routed to
  (:meth:`Link.route`, or ``subscribe(..., inbox=q)``); callbacks never run user code;
* :meth:`Link.publish` never sends a packet larger than the broker's Maximum Packet Size
  (it raises :class:`~fedmq.errors.TransportError` instead); :meth:`Link.max_payload` says
  how large a payload fits;
* subscriptions are made again after every reconnect;
* a message published retained arrives with ``retain`` True, live or replayed (MQTT 5
  Retain As Published; with MQTT 3.1.1 only replayed ones are marked).
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from fedmq.errors import ConfigError
from fedmq.transport.settings import SCHEMES, BrokerSettings

#: Largest packet MQTT can carry (spec 2.2.3: remaining length < 2^28, plus fixed header).
MQTT_MAX_PACKET = 268_435_455 + 5


@dataclass(frozen=True, slots=True)
class Message:
    """One received application message: topic (str), payload (bytes), retain flag."""

    topic: str
    payload: bytes
    retain: bool


@dataclass(frozen=True)
class Will:
    """Last will: published by the broker if the link drops without a clean close."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


def _varint_len(n: int) -> int:
    size = 1
    while n >= 128:
        n >>= 7
        size += 1
    return size


def publish_packet_size(topic: str, payload_len: int, *, qos: int = 1, protocol: str = "5") -> int:
    """Size in bytes of the PUBLISH packet for ``topic`` and a payload of ``payload_len``
    bytes (fixed header, topic, packet id, MQTT 5 empty properties; MQTT 5.0 spec 3.3)."""
    remaining = 2 + len(topic.encode("utf-8")) + (2 if qos > 0 else 0) + (1 if protocol == "5" else 0) + payload_len
    return 1 + _varint_len(remaining) + remaining


def max_payload_for(topic: str, limit: int | None, *, qos: int = 1, protocol: str = "5") -> int:
    """Largest payload (bytes) whose PUBLISH on ``topic`` fits in ``limit`` bytes
    (MQTT's own limit when None)."""
    limit = limit or MQTT_MAX_PACKET
    fixed = publish_packet_size(topic, 0, qos=qos, protocol=protocol)
    best = 0
    # The remaining-length field grows with the payload: try each of its 1..4 sizes.
    for extra in range(4):
        payload = limit - fixed - extra
        if payload > 0 and publish_packet_size(topic, payload, qos=qos, protocol=protocol) <= limit:
            best = max(best, payload)
    return best


class PublishHandle(Protocol):
    """A publish in progress."""

    topic: str

    def done(self) -> bool:
        """True once the broker acknowledged it."""
        ...

    def wait(self, timeout: float) -> None:
        """Block until acknowledged. Raises TransportError after ``timeout`` seconds or on refusal."""
        ...


@runtime_checkable
class Link(Protocol):
    """One connection to a broker (see the module docstring for the contract).

    Attributes:
        settings: the broker settings it was made from (URL, protocol, chunk size).
        client_id: its MQTT client id.
        inbox: default queue of received :class:`Message`.
        connects: connections made so far (first connect and every reconnect).
        taken_over: drops because another client connected with the same client id (the
            broker closes the older connection; MQTT 5 reason 0x8E).
        short_lived: other drops by the broker within seconds of the connect (a takeover by
            a broker that gives no reason, mosquitto 2.0 and MQTT 3.1.1 among them, or a
            broker refusing what the client sends).
    """

    settings: BrokerSettings
    client_id: str
    inbox: queue.SimpleQueue[Message]
    connects: int
    taken_over: int
    short_lived: int

    @property
    def connected(self) -> bool: ...

    def set_will(self, will: Will | None) -> None:
        """Last will for the next connect (call before :meth:`connect`)."""
        ...

    def connect(self, timeout: float | None = None) -> Link:
        """Connect and wait for the broker's answer. Raises TransportError."""
        ...

    def close(self, timeout: float = 5.0) -> None:
        """Disconnect cleanly (no last will)."""
        ...

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every publish queued so far to be acknowledged;
        False when some is not (or the link is down). Call before :meth:`close`."""
        ...

    def max_payload(self, topic: str, qos: int = 1) -> int:
        """Largest payload (bytes) a publish on ``topic`` may carry."""
        ...

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> PublishHandle:
        """Queue a publish (thread-safe). Raises TransportError above the maximum packet size."""
        ...

    def publish_wait(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                     timeout: float = 30.0) -> None:
        """:meth:`publish` and wait for the acknowledgement. Raises TransportError."""
        ...

    def subscribe(self, filters: str | Iterable[str], *, qos: int = 1,
                  inbox: queue.SimpleQueue[Message] | None = None, timeout: float = 10.0) -> None:
        """Subscribe and wait for the broker's answer; retained messages follow. Raises TransportError."""
        ...

    def unsubscribe(self, filters: str | Iterable[str]) -> None: ...

    def route(self, pattern: str, inbox: queue.SimpleQueue[Message]) -> None:
        """Send messages matching ``pattern`` to ``inbox`` instead of :attr:`inbox`."""
        ...

    def unroute(self, pattern: str) -> None: ...


LinkFactory = Callable[[BrokerSettings, str], Link]

_REGISTRY: dict[str, LinkFactory] = {}


def register_link(scheme: str, factory: LinkFactory, *, tls: bool = False) -> None:
    """Use ``factory(settings, client_id) -> Link`` for broker URLs ``scheme://...``; the
    scheme becomes valid in :class:`BrokerSettings` (``tls``: whether it means TLS).

    Raises:
        ConfigError: another factory is registered for ``scheme``.
    """
    other = _REGISTRY.get(scheme)
    if other is not None and other is not factory:
        raise ConfigError(f"a link for URL scheme {scheme!r} is already registered ({other!r})")
    _REGISTRY[scheme] = factory
    SCHEMES.setdefault(scheme, tls)


def link_schemes() -> tuple[str, ...]:
    """URL schemes with a registered link."""
    return tuple(_REGISTRY)


def link_factory(url: str) -> LinkFactory:
    """The factory registered for the scheme of broker URL ``url`` (no scheme: ``mqtt``).

    Raises:
        ConfigError: no link is registered for the URL's scheme.
    """
    scheme = url.split("://", 1)[0].strip().lower() if "://" in url else "mqtt"
    try:
        return _REGISTRY[scheme]
    except KeyError:
        raise ConfigError(f"broker url {url!r}: no link for scheme {scheme!r}, expected one of "
                          f"{link_schemes()}") from None
