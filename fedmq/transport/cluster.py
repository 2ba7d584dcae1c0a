"""Retained messages on every node of a broker cluster that keeps them per node.

RabbitMQ 3.x's MQTT plugin stores a retained message only on the node that received it
(docs/scale.md, "A RabbitMQ cluster"): a device connected to another node never sees the
global model, its task or the round. :class:`RetainedFanoutLink` is the coordinator's side
of the fix: it is the usual link to one node (with its failover) plus one publish-only link
to each node named in ``BrokerSettings.retain_urls``; every retained publish (a retained
clear included) goes out through all of them. Only the main link's acknowledgement is
waited for: a node that is down gets nothing, and whatever it held is what a device that
fails over finds on the other nodes.
"""

from __future__ import annotations

import logging
from typing import Any

from fedmq.errors import TransportError
from fedmq.transport.base import Link, LinkFactory, PublishHandle, Will
from fedmq.transport.settings import BrokerSettings

log = logging.getLogger(__name__)


class RetainedFanoutLink:
    """A :class:`~fedmq.transport.base.Link` that sends each retained publish to every node.

    Everything but :meth:`publish`, :meth:`publish_wait`, :meth:`connect` and
    :meth:`close` is the main link's (subscriptions, inbox, counters).

    Args:
        main: the link to the coordinator's own node (its ``settings.failover_urls`` apply).
        others: not yet connected publish-only links, one per node in ``retain_urls``.
    """

    def __init__(self, main: Link, others: list[Link]) -> None:
        self._main = main
        self._others = others

    @classmethod
    def open(cls, factory: LinkFactory, settings: BrokerSettings, client_id: str) -> RetainedFanoutLink:
        """The main link for ``settings`` and one link per URL of ``settings.retain_urls``
        (client ids ``CLIENT_ID.retainN``), none connected yet."""
        plain = settings.with_(retain_urls=())
        others = [factory(plain.with_(url=url, failover_urls=()), f"{client_id}.retain{i}")
                  for i, url in enumerate(settings.retain_urls)]
        return cls(factory(plain, client_id), others)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._main, name)

    def __setattr__(self, name: str, value: Any) -> None:
        # A wrapper that swaps the inbox (fedmq.transport.counting) must reach the main
        # link, whose network thread fills it.
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        else:
            setattr(self._main, name, value)

    @property
    def settings(self) -> BrokerSettings:
        """The main link's settings plus ``retain_urls`` (what :func:`open_link` was given)."""
        return self._main.settings.with_(retain_urls=tuple(o.settings.url for o in self._others))

    @property
    def connected(self) -> bool:
        return self._main.connected

    def set_will(self, will: Will | None) -> None:
        """The last will is the main link's (the publish-only links have none)."""
        self._main.set_will(will)

    def connect(self, timeout: float | None = None) -> RetainedFanoutLink:
        """Connect the main link (its errors raised: BrokerConnectError), then each other
        node's link; a node that cannot be reached is logged and left out until the next
        :meth:`connect`."""
        self._main.connect(timeout)
        for other in self._others:
            if other.connected:
                continue
            try:
                other.connect(timeout)
            except TransportError as exc:
                log.warning("retained messages will not reach broker node %s: %s", other.settings.url, exc)
        return self

    def flush(self, timeout: float) -> bool:
        """Flush the main link (the retained copies to the other nodes are not waited for)."""
        return self._main.flush(timeout)

    def close(self, timeout: float = 5.0) -> None:
        for other in self._others:
            other.close(timeout)
        self._main.close(timeout)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> PublishHandle:
        """Publish through the main link; a retained message also through every other node's
        link (not waited for). Returns the main link's handle.

        Raises:
            TransportError: as the main link's publish (e.g. packet too large)."""
        handle = self._main.publish(topic, payload, qos=qos, retain=retain)
        if retain:
            self._fan_out(topic, payload, qos)
        return handle

    def publish_wait(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                     timeout: float = 30.0) -> None:
        """As :meth:`publish`, waiting for the main node's acknowledgement only.

        Raises:
            TransportError: the main node did not acknowledge within ``timeout`` seconds."""
        if retain:
            self._fan_out(topic, payload, qos)
        self._main.publish_wait(topic, payload, qos=qos, retain=retain, timeout=timeout)

    def _fan_out(self, topic: str, payload: bytes, qos: int) -> None:
        for other in self._others:
            if not other.connected:
                continue
            try:
                other.publish(topic, payload, qos=qos, retain=True)
            except TransportError as exc:
                log.warning("retained %s not sent to broker node %s: %s", topic, other.settings.url, exc)
