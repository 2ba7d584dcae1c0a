"""A link wrapper that gives a virtual device a slow uplink and a way to vanish.

:class:`ShapedLink` wraps any :class:`fedmq.transport.Link` (a real ``MqttLink`` in the fleet
simulator). Every publish first waits ``latency_s + len(payload) / bandwidth`` seconds
on the calling thread, so a client update of ``n`` bytes takes as long to leave the device as
it would over an uplink of ``bandwidth`` bytes/s with a one-way latency of ``latency_s``
(the blob sender publishes chunk by chunk, so a large update is paced chunk by chunk).
Received messages are not delayed: the downlink is taken as fast (documented in docs/scale.md).

:meth:`ShapedLink.vanish` is a device losing power: the status it set as its last will is
published (the same retained message the broker would publish for it) and the connection
is closed, so the coordinator sees exactly what a dead device causes.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

from fedmq.errors import TransportError
from fedmq.transport import Link, Message, Will
from fedmq.transport.base import PublishHandle


class ShapedLink:
    """A :class:`fedmq.transport.Link` whose publishes are delayed like a slow uplink.

    Args:
        link: the real link, not yet connected.
        bandwidth: uplink bytes per second (> 0).
        latency_s: seconds added to every publish (>= 0).
        stop: when set, waits end at once (the device is being stopped).

    Every other attribute and method is the wrapped link's.
    """

    def __init__(self, link: Link, *, bandwidth: float, latency_s: float, stop: threading.Event | None = None) -> None:
        if not bandwidth > 0 or latency_s < 0:
            raise ValueError(f"bandwidth must be > 0 and latency_s >= 0, got {bandwidth}, {latency_s}")
        self._link = link
        self.bandwidth = float(bandwidth)
        self.latency_s = float(latency_s)
        self._stop = stop if stop is not None else threading.Event()
        self._will: Will | None = None
        #: Seconds spent waiting on the simulated uplink, and bytes sent through it.
        self.shaped_s = 0.0
        self.bytes_sent = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._link, name)

    # The wrapped link delivers into its own inbox: a wrapper above this one (the agent's
    # CountingLink) that replaces the inbox must replace the wrapped link's, or nothing arrives.
    @property
    def inbox(self) -> queue.SimpleQueue[Message]:
        return self._link.inbox

    @inbox.setter
    def inbox(self, inbox: queue.SimpleQueue[Message]) -> None:
        self._link.inbox = inbox

    def set_will(self, will: Will | None) -> None:
        self._will = will
        self._link.set_will(will)

    def _pace(self, n: int) -> None:
        delay = self.latency_s + n / self.bandwidth
        self.shaped_s += delay
        self.bytes_sent += n
        if delay > 0:
            self._stop.wait(delay)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> PublishHandle:
        self._pace(len(payload))
        return self._link.publish(topic, payload, qos=qos, retain=retain)

    def publish_wait(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                     timeout: float = 30.0) -> None:
        self._pace(len(payload))
        self._link.publish_wait(topic, payload, qos=qos, retain=retain, timeout=timeout)

    def vanish(self, timeout: float = 5.0) -> None:
        """Disappear as a dead device does: publish the last will, then close."""
        will = self._will
        if will is not None and self._link.connected:
            try:
                self._link.publish_wait(will.topic, will.payload, qos=will.qos, retain=will.retain, timeout=timeout)
            except TransportError:
                pass  # the broker did not acknowledge it: the device is gone either way
        self._link.close()
