"""A thin MQTT link over paho-mqtt 2.x: connect, subscribe, publish, and an inbox queue.

paho's callbacks run on its network thread; here they only put messages on queues and
record connection state, so a slow consumer never stalls keepalive. paho does not honour
the broker's Maximum Packet Size (it would loop resending an oversized publish after
every disconnect): :meth:`MqttLink.publish` refuses any packet larger than the size the
broker announced in its CONNACK. See docs/wire-format.md and the field notes.
"""

from __future__ import annotations

import logging
import queue
import random
import ssl
import threading
import time
from collections.abc import Iterable

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from fedmq.errors import TransportError
from fedmq.transport.base import MQTT_MAX_PACKET, Message, Will, max_payload_for, publish_packet_size
from fedmq.transport.settings import BrokerSettings

__all__ = ["MQTT_MAX_PACKET", "Message", "MqttLink", "Publish", "Will", "publish_packet_size"]

log = logging.getLogger(__name__)

class Publish:
    """Handle of one publish; :meth:`wait` blocks until the broker acknowledged it (QoS 1)."""

    __slots__ = ("_link", "_info", "topic", "qos", "_queued")

    def __init__(self, link: MqttLink, info: paho.MQTTMessageInfo, topic: str, qos: int) -> None:
        self._link = link
        self._info = info
        self.topic = topic
        self.qos = qos
        self._queued = info.rc == paho.MQTT_ERR_NO_CONN

    def _published(self) -> bool:
        if self._queued:
            return self._info.mid in self._link._acked  # noqa: SLF001  (read under the link's condition)
        return self._info.is_published()

    @property
    def mid(self) -> int:
        return self._info.mid

    def done(self) -> bool:
        with self._link._state:  # noqa: SLF001
            return self._published()

    def wait(self, timeout: float) -> None:
        """Wait until the broker acknowledged the publish (PUBACK for QoS 1, written to the
        socket for QoS 0). A publish made while disconnected is sent after the reconnect,
        and waiting covers that.

        Raises:
            TransportError: not acknowledged within ``timeout`` seconds (paho keeps it queued
                and still sends it later), or the broker refused it (reason code in the message).
        """
        info = self._info
        link = self._link
        deadline = time.monotonic() + timeout
        # paho's own wait_for_publish() raises at once for a message queued while the link
        # was down, although paho sends it after the reconnect; so wait for on_publish.
        # paho runs on_publish just before it marks the message published, so the wait is
        # sliced: the flag is set microseconds after the notification.
        with link._state:  # noqa: SLF001  (the link's own condition, notified by on_publish)
            while not self._published():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TransportError(f"publish to {self.topic!r} not acknowledged within {timeout:.1f} s "
                                         f"(broker {link.settings.url}, connected={link.connected})")
                link._state.wait(min(remaining, 0.05))  # noqa: SLF001
        failure = link.publish_failure(info.mid)
        if failure is not None:
            raise TransportError(f"broker refused publish to {self.topic!r}: {failure}")


class MqttLink:
    """One MQTT connection (paho-mqtt 2.x, ``CallbackAPIVersion.VERSION2``) with
    automatic reconnect.

    Received messages go to :attr:`inbox` (a ``queue.SimpleQueue`` of :class:`Message`),
    or to the queue given to :meth:`subscribe` for that filter. Subscriptions are made
    again after every reconnect, even when the broker says it kept the session: a client
    that took our client id in between leaves an empty session that still reports
    ``session_present`` (the field notes' client-id takeover).

    Args:
        settings: broker URL, protocol, credentials, TLS, session and chunk settings.
        client_id: MQTT client id (the device id for devices: a persistent session is
            found again by it). Random when empty (then the session cannot persist).
        will: last will, published by the broker if the connection drops uncleanly.
        inflight: most QoS 1 publishes paho keeps unacknowledged on the wire (>= 1).
    """

    def __init__(self, settings: BrokerSettings, client_id: str = "", *, will: Will | None = None,
                 inflight: int = 32) -> None:
        self.settings = settings
        self.client_id = client_id
        self.inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._state = threading.Condition(self._lock)
        self._connected = False
        self._closing = False
        self._connect_failure: str | None = None
        self._subs: dict[str, int] = {}
        self._subacks: dict[int, list[ReasonCode]] = {}
        self._ignored_subacks: set[int] = set()
        self._publish_failures: dict[int, str] = {}
        #: mids acknowledged by on_publish, for publishes queued while disconnected (their
        #: paho handle's is_published() raises "not currently connected" forever). At most
        #: 65,535 entries (MQTT packet ids are 16-bit); a queued publish drops its mid first.
        self._acked: set[int] = set()
        self.session_present = False
        #: Broker's Maximum Packet Size from the last CONNACK (bytes), None if it set none.
        self.broker_max_packet: int | None = None
        #: Connections made (first connect and every reconnect) and drops seen.
        self.connects = 0
        self.disconnects = 0

        v5 = settings.protocol == "5"
        self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                   protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
                                   clean_session=None if v5 else True, reconnect_on_failure=True)
        self._client.max_inflight_messages_set(max(1, inflight))
        self._client.reconnect_delay_set(*self._backoff())
        user, password = settings.credentials()
        if user is not None:
            self._client.username_pw_set(user, password)
        if settings.tls:
            self._client.tls_set(ca_certs=settings.ca_file, certfile=settings.cert_file, keyfile=settings.key_file,
                                 cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
            if settings.tls_insecure:
                self._client.tls_insecure_set(True)
        if will is not None:
            self._client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_publish = self._on_publish
        self._client.on_subscribe = self._on_subscribe
        self._started = False

    def _backoff(self) -> tuple[int, int]:
        # paho takes the bounds as ints in its signature but computes in floats.
        lo = self.settings.reconnect_min * random.uniform(0.5, 1.5)
        return lo, max(lo, self.settings.reconnect_max)  # type: ignore[return-value]

    # -- paho callbacks (network thread): record state, queue messages, nothing else ---------

    def _on_connect(self, client: paho.Client, userdata: object, flags: paho.ConnectFlags, reason: ReasonCode,
                    properties: Properties | None) -> None:
        if reason.is_failure:
            log.warning("broker %s refused client %r: %s", self.settings.url, self.client_id, reason)
            with self._state:
                self._connect_failure = f"{reason} (code {reason.value})"
                self._state.notify_all()
            return
        max_packet = getattr(properties, "MaximumPacketSize", None) if properties is not None else None
        with self._state:
            self.session_present = bool(flags.session_present)
            self.broker_max_packet = int(max_packet) if max_packet else None
            self._connected = True
            self._connect_failure = None
            self.connects += 1
            subs = list(self._subs.items())
            self._state.notify_all()
        if subs:
            # Non-blocking; its SUBACK is handled on this thread after we return, so
            # marking its mid as ignored cannot race with it.
            _, mid = client.subscribe([(f, self._sub_options(qos)) for f, qos in subs])
            if mid is not None:
                with self._state:
                    self._ignored_subacks.add(mid)

    def _on_disconnect(self, client: paho.Client, userdata: object, flags: paho.DisconnectFlags,
                       reason: ReasonCode, properties: Properties | None) -> None:
        if not self._closing:
            log.info("client %r lost broker %s (%s); reconnecting", self.client_id, self.settings.url, reason)
        with self._state:
            if self._connected:
                self.disconnects += 1
            self._connected = False
            self._state.notify_all()
        if not self._closing:
            client.reconnect_delay_set(*self._backoff())

    def _on_message(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        self.inbox.put(Message(msg.topic, msg.payload, bool(msg.retain)))

    def _on_subscribe(self, client: paho.Client, userdata: object, mid: int, reasons: list[ReasonCode],
                      properties: Properties | None) -> None:
        with self._state:
            if mid in self._ignored_subacks:
                self._ignored_subacks.discard(mid)
                return
            self._subacks[mid] = reasons
            self._state.notify_all()

    def _on_publish(self, client: paho.Client, userdata: object, mid: int, reason: ReasonCode,
                    properties: Properties | None) -> None:
        with self._state:
            if reason.is_failure:
                self._publish_failures[mid] = f"{reason} (code {reason.value})"
            self._acked.add(mid)
            self._state.notify_all()

    def publish_failure(self, mid: int) -> str | None:
        """The broker's refusal of publish ``mid`` (reason and code), once; None if it was accepted."""
        with self._state:
            return self._publish_failures.pop(mid, None)

    # -- public API ------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected

    def set_will(self, will: Will | None) -> None:
        """Last will for the next connect (call before :meth:`connect`)."""
        if will is None:
            self._client.will_clear()
        else:
            self._client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)

    def connect(self, timeout: float | None = None) -> MqttLink:
        """Start the network thread and wait for the first CONNACK.

        Args:
            timeout: seconds to wait (``settings.connect_timeout`` when None). The link keeps
                retrying in the background after a timeout only if it was not refused.

        Raises:
            TransportError: the broker refused the connection (bad credentials, not
                authorised: reason in the message), or no CONNACK within ``timeout``.
        """
        timeout = self.settings.connect_timeout if timeout is None else timeout
        s = self.settings
        props = None
        clean_start: bool | int = paho.MQTT_CLEAN_START_FIRST_ONLY
        if s.protocol == "5":
            clean_start = not s.persistent
            if s.persistent:
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = int(s.session_expiry)
        if not self._started:
            self._client.connect_async(s.host, s.port, keepalive=s.keepalive, clean_start=clean_start,
                                       properties=props)
            self._client.loop_start()
            self._started = True
        if not self.wait_connected(timeout):
            with self._state:
                failure = self._connect_failure
            if failure is not None:
                self.close()
                raise TransportError(f"broker {s.url} refused the connection of client {self.client_id!r}: "
                                     f"{failure}")
            raise TransportError(f"no connection to broker {s.url} within {timeout:.1f} s "
                                 f"(client {self.client_id!r})")
        return self

    def wait_connected(self, timeout: float) -> bool:
        """Wait until connected (True) or a refusal / timeout (False)."""
        with self._state:
            return self._state.wait_for(lambda: self._connected or self._connect_failure is not None
                                        or self._closing, timeout) and self._connected

    def close(self, timeout: float = 5.0) -> None:
        """Disconnect cleanly (the broker does not publish the last will) and stop the
        network thread. Messages still queued in paho are dropped."""
        self._closing = True
        with self._state:
            self._state.notify_all()
        if self._started:
            self._client.disconnect()
            self._client.loop_stop()
            self._started = False

    def __enter__(self) -> MqttLink:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def max_payload(self, topic: str, qos: int = 1) -> int:
        """Largest payload (bytes) a publish on ``topic`` may carry under the broker's
        Maximum Packet Size (MQTT's own limit when the broker set none)."""
        return max_payload_for(topic, self.broker_max_packet, qos=qos, protocol=self.settings.protocol)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> Publish:
        """Queue a publish (thread-safe, non-blocking). If the link is down, paho keeps a
        QoS 1 message in memory and sends it after the reconnect.

        Raises:
            TransportError: the packet would exceed the broker's Maximum Packet Size (the
                broker would disconnect us and paho would resend it forever).
        """
        size = publish_packet_size(topic, len(payload), qos=qos, protocol=self.settings.protocol)
        limit = self.broker_max_packet or MQTT_MAX_PACKET
        if size > limit:
            raise TransportError(f"publish to {topic!r}: packet of {size} bytes exceeds the broker's maximum "
                                 f"packet size {limit} bytes; send it as a chunked blob")
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc == paho.MQTT_ERR_QUEUE_SIZE:
            raise TransportError(f"publish to {topic!r}: paho's outgoing queue is full")
        if info.rc == paho.MQTT_ERR_NO_CONN:
            # Queued until the reconnect: an acknowledgement of an earlier message with the
            # same (recycled) mid must not count for this one.
            with self._state:
                self._acked.discard(info.mid)
        return Publish(self, info, topic, qos)

    def publish_wait(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                     timeout: float = 30.0) -> None:
        """:meth:`publish` and wait for the acknowledgement. Raises: TransportError."""
        self.publish(topic, payload, qos=qos, retain=retain).wait(timeout)

    def _sub_options(self, qos: int) -> SubscribeOptions | int:
        return SubscribeOptions(qos=qos) if self.settings.protocol == "5" else qos

    def route(self, pattern: str, inbox: queue.SimpleQueue[Message]) -> None:
        """Send messages whose topic matches ``pattern`` (MQTT filter syntax) to ``inbox``
        instead of :attr:`inbox`, whatever subscription brought them."""
        def route(client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
            inbox.put(Message(msg.topic, msg.payload, bool(msg.retain)))
        self._client.message_callback_add(pattern, route)

    def unroute(self, pattern: str) -> None:
        """Undo :meth:`route`: matching messages go to :attr:`inbox` again."""
        self._client.message_callback_remove(pattern)

    def subscribe(self, filters: str | Iterable[str], *, qos: int = 1,
                  inbox: queue.SimpleQueue[Message] | None = None, timeout: float = 10.0) -> None:
        """Subscribe to one or more topic filters and wait for the SUBACK.

        Messages matching a filter go to ``inbox`` if given (see :meth:`route`), else to
        :attr:`inbox`. The subscription is remembered and made again after a reconnect
        (unless the broker kept the session). Subscribing again to a filter makes the
        broker send its retained messages again.

        Raises:
            TransportError: not connected, no SUBACK within ``timeout`` seconds, or the
                broker refused a filter. The subscription is still made on the next connect.
        """
        items = [filters] if isinstance(filters, str) else list(filters)
        if not items:
            return
        deadline = time.monotonic() + timeout
        with self._state:
            for f in items:
                self._subs[f] = qos
        if inbox is not None:
            for f in items:
                self.route(f, inbox)
        if not self.wait_connected(timeout):
            raise TransportError(f"subscribe {items[:3]}: not connected to {self.settings.url} within "
                                 f"{timeout:.1f} s")
        connects = self.connects
        rc, mid = self._client.subscribe([(f, self._sub_options(qos)) for f in items])
        if rc != paho.MQTT_ERR_SUCCESS or mid is None:
            raise TransportError(f"subscribe {items[:3]}: link down (paho rc {rc}); made again on reconnect")
        with self._state:
            # A reconnect in between loses this SUBACK for good, but the reconnect made the
            # subscription again (with the others): waiting on would only run out the timeout.
            got = self._state.wait_for(lambda: mid in self._subacks or self.connects != connects,
                                       max(0.0, deadline - time.monotonic()))
            reasons = self._subacks.pop(mid, None)
            if reasons is None:
                self._ignored_subacks.add(mid)
                if got:
                    return
        if reasons is None:
            raise TransportError(f"no SUBACK for {items[:3]} within {timeout:.1f} s (broker {self.settings.url})")
        refused = [f for f, r in zip(items, reasons) if r.is_failure]
        if refused:
            raise TransportError(f"broker {self.settings.url} refused subscription(s) {refused}")

    def unsubscribe(self, filters: str | Iterable[str]) -> None:
        """Remove subscriptions (does not wait for the UNSUBACK; messages already queued
        for them may still arrive on the filter's queue)."""
        items = [filters] if isinstance(filters, str) else list(filters)
        if not items:
            return
        with self._state:
            for f in items:
                self._subs.pop(f, None)
        self._client.unsubscribe(items)
