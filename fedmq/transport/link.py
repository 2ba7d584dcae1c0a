"""A thin MQTT link over paho-mqtt 2.x: connect, subscribe, publish, and an inbox queue.

paho's callbacks run on its network thread; here they only put messages on queues and
record connection state, so a slow consumer never stalls keepalive. paho does not honour
the broker's Maximum Packet Size (it would loop resending an oversized publish after
every disconnect): :meth:`MqttLink.publish` refuses any packet larger than the size the
broker announced in its CONNACK. See docs/wire-format.md and the field notes.
"""

from __future__ import annotations

import errno
import logging
import queue
import random
import socket
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

from fedmq.errors import BrokerConnectError, TransportError
from fedmq.transport.base import MQTT_MAX_PACKET, Message, Will, max_payload_for, publish_packet_size
from fedmq.transport.settings import BrokerSettings, parse_broker_url

__all__ = ["MQTT_MAX_PACKET", "Message", "MqttLink", "Publish", "Will", "publish_packet_size"]

log = logging.getLogger(__name__)
#: MQTT 5 reason code of a DISCONNECT sent because another client took the session over.
_SESSION_TAKEN_OVER = 0x8E
#: A connection the broker closes within this many seconds of accepting it counts as short-lived.
SHORT_LIVED_S = 5.0

#: CONNACK reason codes that mean the credentials are wrong (MQTT 5 spec 3.2.2.2;
#: paho maps the 3.1.1 return codes 4 and 5 onto them).
_NOT_AUTHORISED = {134: "bad user name or password", 135: "not authorised"}


def _socket_error(s: BrokerSettings, client_id: str, exc: OSError, timeout: float) -> BrokerConnectError:
    """Name the cause of a failed socket connection or TLS handshake."""
    where = f"cannot connect to broker {s.url} (client {client_id!r})"
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = exc.verify_message or exc.reason or str(exc)
        return BrokerConnectError(f"{where}: TLS handshake failed: certificate verify failed: {reason} "
                                  "(check ca_file and that the broker's certificate names this host)", "tls", s.url)
    if isinstance(exc, ssl.SSLError):
        return BrokerConnectError(f"{where}: TLS handshake failed: {exc.reason or exc} (is {s.host}:{s.port} a "
                                  "TLS listener; are ca_file, cert_file and key_file the broker's?)", "tls", s.url)
    if s.tls and isinstance(exc, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)):
        # A refused TCP connection is ConnectionRefusedError; a reset of an accepted one
        # comes from a peer that did not like our ClientHello: a plain-MQTT listener.
        return BrokerConnectError(f"{where}: TLS handshake failed: the broker closed the connection "
                                  f"({exc.strerror}); is {s.host}:{s.port} a TLS listener? (mqtts:// expects "
                                  "one, mqtt:// is plain)", "tls", s.url)
    if isinstance(exc, socket.gaierror):
        return BrokerConnectError(f"{where}: host name {s.host!r} cannot be resolved ({exc.strerror})",
                                  "unresolvable", s.url)
    if isinstance(exc, ConnectionRefusedError):
        return BrokerConnectError(f"{where}: connection refused by {s.host}:{s.port} (no broker listens on "
                                  "that port: is it running, is the port right?)", "refused", s.url)
    if isinstance(exc, TimeoutError):
        return BrokerConnectError(f"{where}: no answer from {s.host}:{s.port} within {timeout:.1f} s",
                                  "timeout", s.url)
    reason = exc.strerror or errno.errorcode.get(exc.errno or 0) or str(exc)
    return BrokerConnectError(f"{where}: {reason}", "unreachable", s.url)


def _connack_error(s: BrokerSettings, client_id: str, reason: ReasonCode) -> BrokerConnectError:
    """Name the cause of a failing CONNACK."""
    where = f"broker {s.url} refused the connection of client {client_id!r}: {reason} (code {reason.value})"
    if reason.value in _NOT_AUTHORISED:
        user = s.username_file and f"username_file {s.username_file}" or (s.username and f"username {s.username!r}")
        return BrokerConnectError(f"{where}: {_NOT_AUTHORISED[reason.value]}; check "
                                  f"{user or 'the username (none set)'}, password_file and the broker's accounts",
                                  "not_authorised", s.url)
    return BrokerConnectError(where, "refused_by_broker", s.url)


class Publish:
    """Handle of one publish; :meth:`wait` blocks until the broker acknowledged it (QoS 1).

    Completion is what the link's ``on_publish`` saw for this message id after the publish
    was queued (paho's own ``is_published()`` raises for a message queued while the link
    was down, although paho sends it after the reconnect).
    """

    __slots__ = ("_link", "mid", "_after", "topic", "qos")

    def __init__(self, link: MqttLink, mid: int, after: int, topic: str, qos: int) -> None:
        self._link = link
        self.mid = mid
        self._after = after
        self.topic = topic
        self.qos = qos

    def done(self) -> bool:
        return self._link.acknowledged(self.mid, self._after)

    def wait(self, timeout: float) -> None:
        """Wait until the broker acknowledged the publish (PUBACK for QoS 1, written to the
        socket for QoS 0). A publish made while disconnected is sent after the reconnect,
        and waiting covers that.

        Raises:
            TransportError: not acknowledged within ``timeout`` seconds (paho keeps it queued
                and still sends it later), or the broker refused it (reason code in the message).
        """
        link = self._link
        if not link.wait_acknowledged(self.mid, self._after, timeout):
            raise TransportError(f"publish to {self.topic!r} not acknowledged within {timeout:.1f} s "
                                 f"(broker {link.settings.url}, connected={link.connected})")
        failure = link.publish_failure(self.mid)
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
        self._connect_failure: ReasonCode | None = None
        self._subs: dict[str, int] = {}
        self._subacks: dict[int, list[ReasonCode]] = {}
        self._ignored_subacks: set[int] = set()
        self._publish_failures: dict[int, str] = {}
        # on_publish count and, per message id, the count at its last acknowledgement: a
        # publish is done once its id was acknowledged after it was queued (ids wrap at 65535).
        self._ack_seq = 0
        self._acked: dict[int, int] = {}
        self._unacked: set[int] = set()  # ids of publishes queued and not yet acknowledged
        self.session_present = False
        #: Broker's Maximum Packet Size from the last CONNACK (bytes), None if it set none.
        self.broker_max_packet: int | None = None
        #: Connections made (first connect and every reconnect) and drops seen.
        self.connects = 0
        self.disconnects = 0
        #: Drops because another client connected with this client id (MQTT 5 DISCONNECT
        #: reason 0x8E, session taken over); and other drops within SHORT_LIVED_S of the
        #: connect (mosquitto 2.0 and MQTT 3.1.1 just close the socket on a takeover).
        self.taken_over = 0
        self.short_lived = 0
        self._connected_at = 0.0
        #: Index in ``settings.urls`` of the node connected to (or being tried), and how
        #: many times a reconnect moved to another node (``settings.failover_urls``).
        self.url_index = 0
        self.failovers = 0
        self._move_on_reconnect = False

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
        self._client.on_pre_connect = self._on_pre_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_publish = self._on_publish
        self._client.on_subscribe = self._on_subscribe
        self._started = False

    def _backoff(self) -> tuple[int, int]:
        # paho takes the bounds as ints in its signature but computes in floats.
        lo = self.settings.reconnect_min * random.uniform(0.5, 1.5)
        return lo, max(lo, self.settings.reconnect_max)  # type: ignore[return-value]

    @property
    def current_url(self) -> str:
        """The URL of the node this link is connected to (or trying); ``settings.url``
        unless it failed over to one of ``settings.failover_urls``."""
        return self.settings.urls[self.url_index]

    # -- paho callbacks (network thread): record state, queue messages, nothing else ---------

    def _on_pre_connect(self, client: paho.Client, userdata: object) -> None:
        # paho calls this at the start of every connection attempt, its own reconnects (and
        # the shared network loop's) included. Every attempt after the first moves to the
        # next node: a node that dropped us or refused the last attempt is probably gone,
        # and any node of the cluster serves the same session.
        urls = self.settings.urls
        if self._move_on_reconnect and len(urls) > 1:
            self.url_index = (self.url_index + 1) % len(urls)
            host, port, _ = parse_broker_url(urls[self.url_index])
            # paho's host/port setters refuse while a connection is being opened, which is
            # exactly when it reads them next (to create the socket).
            client._host, client._port = host, port
            self.failovers += 1
            log.info("client %r fails over to broker %s", self.client_id, urls[self.url_index])
        self._move_on_reconnect = True

    def _on_connect(self, client: paho.Client, userdata: object, flags: paho.ConnectFlags, reason: ReasonCode,
                    properties: Properties | None) -> None:
        if reason.is_failure:
            log.warning("broker %s refused client %r: %s", self.settings.url, self.client_id, reason)
            with self._state:
                self._connect_failure = reason
                self._state.notify_all()
            return
        max_packet = getattr(properties, "MaximumPacketSize", None) if properties is not None else None
        with self._state:
            self.session_present = bool(flags.session_present)
            self.broker_max_packet = int(max_packet) if max_packet else None
            self._connected = True
            self._connected_at = time.monotonic()
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
            log.info("client %r lost broker %s (%s); reconnecting", self.client_id, self.current_url, reason)
        with self._state:
            if self._connected:
                self.disconnects += 1
            if reason == _SESSION_TAKEN_OVER:
                self.taken_over += 1
            elif self._connected and not self._closing and time.monotonic() - self._connected_at < SHORT_LIVED_S:
                self.short_lived += 1
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
            self._ack_seq += 1
            self._acked[mid] = self._ack_seq
            self._unacked.discard(mid)
            self._state.notify_all()

    def acknowledged(self, mid: int, after: int) -> bool:
        """True once publish ``mid`` (queued when the acknowledgement count was ``after``) is acknowledged."""
        with self._state:
            return self._acked.get(mid, 0) > after

    def wait_acknowledged(self, mid: int, after: int, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for :meth:`acknowledged`."""
        with self._state:
            return self._state.wait_for(lambda: self._acked.get(mid, 0) > after, timeout)

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
        """Open the connection and wait for the first CONNACK, then keep it up from the
        network thread (reconnecting with backoff after any later drop).

        The socket connection and TLS handshake are made here, synchronously, so that a
        failure is reported at once with its cause (a refused port within milliseconds,
        not after ``timeout``); nothing is left running after such a failure and calling
        :meth:`connect` again retries. With ``settings.failover_urls`` the nodes are tried
        in order, ``url`` first, and the first that accepts the socket is used.

        Args:
            timeout: seconds the whole attempt may take, socket, TLS handshake and CONNACK
                (``settings.connect_timeout`` when None). After a CONNACK timeout the link
                keeps retrying in the background; after a refusal it does not.

        Raises:
            BrokerConnectError: (a TransportError) naming the broker URL and the cause:
                ``refused`` (nothing listens there), ``unresolvable`` (bad host name),
                ``unreachable``, ``tls`` (with the reason, e.g. certificate verify failed),
                ``not_authorised`` (CONNACK 134 bad user name or password / 135 not
                authorised), ``refused_by_broker`` (another CONNACK reason) or
                ``timeout`` (no answer or no CONNACK within ``timeout``). When every node
                of a cluster failed, the message names each one's cause.
        """
        timeout = self.settings.connect_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        s = self.settings
        if not self._started:
            self._closing = False  # connect() after close(): reconnect after drops again
            props = None
            clean_start: bool | int = paho.MQTT_CLEAN_START_FIRST_ONLY
            if s.protocol == "5":
                clean_start = not s.persistent
                if s.persistent:
                    props = Properties(PacketTypes.CONNECT)
                    props.SessionExpiryInterval = int(s.session_expiry)
            self._client.connect_timeout = timeout
            # The first node that accepts the socket (and TLS handshake) is the one used.
            failures: list[BrokerConnectError] = []
            opened = False
            for index, url in enumerate(s.urls):
                self.url_index, self._move_on_reconnect = index, False
                host, port, _ = parse_broker_url(url)
                try:
                    self._client.connect(host, port, keepalive=s.keepalive, clean_start=clean_start,
                                         properties=props)
                    opened = True
                    break
                except OSError as exc:  # ssl.SSLError included
                    failures.append(_socket_error(s.with_(url=url, failover_urls=()), self.client_id, exc,
                                                  timeout))
                    if time.monotonic() >= deadline:
                        break
            if not opened:
                if len(failures) == 1:
                    raise failures[0]
                raise BrokerConnectError("; ".join(str(f) for f in failures), failures[-1].cause, s.url)
            self._start_network()
            self._started = True
        if not self.wait_connected(max(0.0, deadline - time.monotonic())):
            with self._state:
                failure = self._connect_failure
            if failure is not None:
                self.close()
                raise _connack_error(s, self.client_id, failure)
            raise BrokerConnectError(f"cannot connect to broker {s.url} (client {self.client_id!r}): no CONNACK "
                                     f"within {timeout:.1f} s (a TLS broker that rejected our client "
                                     "certificate also looks like this: check cert_file / key_file)",
                                     "timeout", s.url)
        return self

    def _start_network(self) -> None:
        """Start driving the connection: paho's own network thread (one per link). A subclass
        that shares one network loop among many links (fedmq.transport.netloop) hands the
        client to that loop instead."""
        self._client.loop_start()

    def _stop_network(self) -> None:
        """Stop driving the connection (after the DISCONNECT was queued)."""
        self._client.loop_stop()

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
            self._stop_network()
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
        with self._state:
            after = self._ack_seq
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc == paho.MQTT_ERR_QUEUE_SIZE:
            raise TransportError(f"publish to {topic!r}: paho's outgoing queue is full")
        with self._state:
            if self._acked.get(info.mid, 0) <= after:  # not acknowledged already
                self._unacked.add(info.mid)
        return Publish(self, info.mid, after, topic, qos)

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until every publish queued so far is acknowledged
        (PUBACK for QoS 1, written to the socket for QoS 0); call it before :meth:`close` so
        that the last receipts and retained state are not dropped with paho's queue. Returns
        at once (False) while the link is down: paho would only send them after a reconnect.

        Returns:
            True when nothing is left unacknowledged.
        """
        with self._state:
            return self._state.wait_for(lambda: not self._unacked or not self._client.is_connected(),
                                        timeout) and not self._unacked

    def publish_wait(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                     timeout: float = 30.0) -> None:
        """:meth:`publish` and wait for the acknowledgement. Raises: TransportError."""
        self.publish(topic, payload, qos=qos, retain=retain).wait(timeout)

    def _sub_options(self, qos: int) -> SubscribeOptions | int:
        # Retain As Published (MQTT 5.0, 3.8.3.1): a message published retained keeps its
        # retain flag on live delivery too, so a receiver can tell (and refuse) retained
        # client updates as they arrive, not only when a later subscription replays them.
        return SubscribeOptions(qos=qos, retainAsPublished=True) if self.settings.protocol == "5" else qos

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
