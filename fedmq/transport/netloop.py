"""One network thread for many MQTT connections (the fleet simulator's ten thousand devices).

:class:`MqttLink` drives its connection with paho's own network thread (``loop_start``):
one thread per connection, which caps a process at a few thousand links. A
:class:`SharedLoopLink` is the same link whose paho client is driven by a
:class:`NetworkLoop` instead: one thread that waits on every socket with a selector and
calls paho's ``loop_read`` / ``loop_write`` / ``loop_misc`` (paho-mqtt 2.x's external
event loop API: ``on_socket_open``, ``on_socket_close``, ``on_socket_register_write``).
Everything above the link (subscribe, publish, acknowledgements, the inbox) is unchanged.

The loop also does what paho's thread does after a drop: it reconnects, after the link's
jittered back-off (``reconnect_min`` .. ``reconnect_max`` seconds), so that thousands of
links dropped at once by a broker restart do not come back in one storm.
"""

from __future__ import annotations

import logging
import random
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho

from fedmq.transport.link import MqttLink
from fedmq.transport.settings import BrokerSettings

__all__ = ["NetworkLoop", "SharedLoopLink"]

log = logging.getLogger(__name__)

#: Seconds between two calls of paho's ``loop_misc`` (keepalive pings) and two looks for
#: reconnects due; keepalives are tens of seconds.
MISC_INTERVAL_S = 1.0


class NetworkLoop:
    """One daemon thread that drives the connections of many :class:`SharedLoopLink`.

    Thread-safe: links are added, publish and close from any thread; every selector
    operation runs on the loop's thread (commands are queued and the loop woken through a
    socket pair).
    """

    def __init__(self, name: str = "fedmq-netloop") -> None:
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._commands: list[tuple[str, SharedLoopLink, Any]] = []
        self._links: set[SharedLoopLink] = set()
        self._reconnect_at: dict[SharedLoopLink, float] = {}
        self._stopped = False
        self._thread = threading.Thread(target=self._run, daemon=True, name=name)
        self._thread.start()

    @property
    def links(self) -> int:
        """Links the loop drives now."""
        return len(self._links)

    def stop(self) -> None:
        """End the loop's thread (links still open are left as they are)."""
        self._stopped = True
        self._wake()
        self._thread.join(timeout=5.0)

    def _wake(self) -> None:
        if threading.current_thread() is self._thread:
            return
        try:
            self._wake_w.send(b"x")
        except BlockingIOError:
            pass  # the pipe is full: the loop is awake anyway

    def command(self, kind: str, link: SharedLoopLink, arg: Any = None) -> None:
        """Queue ``kind`` (``add``, ``open``, ``close_sock``, ``write``, ``release``) for the loop."""
        with self._lock:
            self._commands.append((kind, link, arg))
        self._wake()

    # -- the loop's thread ------------------------------------------------------------------

    def _run(self) -> None:
        next_misc = time.monotonic()
        while not self._stopped:
            now = time.monotonic()
            timeout = max(0.0, min(next_misc, *self._reconnect_at.values()) - now) if self._reconnect_at \
                else max(0.0, next_misc - now)
            for key, mask in self._sel.select(timeout):
                link = key.data
                if link is None:
                    try:
                        while self._wake_r.recv(4096):
                            pass
                    except BlockingIOError:
                        pass
                    continue
                self._guarded(link, mask)
            self._apply_commands()
            now = time.monotonic()
            if now >= next_misc:
                next_misc = now + MISC_INTERVAL_S
                for link in list(self._links):
                    if link._closing and link._client.socket() is None:
                        self._links.discard(link)
                        continue
                    link._client.loop_misc()
                    self._interest(link)
                    self._watch(link, now)
            for link, when in list(self._reconnect_at.items()):
                if when <= now:
                    del self._reconnect_at[link]
                    self._reconnect(link)

    def _guarded(self, link: SharedLoopLink, mask: int) -> None:
        # One link's failure must not stop the loop that drives thousands of others.
        client = link._client
        try:
            if mask & selectors.EVENT_READ:
                client.loop_read()
            if mask & selectors.EVENT_WRITE:
                client.loop_write()
            self._interest(link)
        except Exception:
            # paho's keepalive check (loop_misc) drops a connection that stops answering.
            log.exception("client %r: error in the network loop", link.client_id)

    def _apply_commands(self) -> None:
        with self._lock:
            commands, self._commands = self._commands, []
        for kind, link, arg in commands:
            if kind == "add":
                self._links.add(link)
            elif kind == "open":
                self._register(link, arg)
            elif kind == "close_sock":
                self._unregister(arg)
            elif kind == "write":
                link._client.loop_write()
                self._interest(link)
            elif kind == "release":
                # close() queued the DISCONNECT: write it (paho closes the socket after it;
                # a link whose socket is still open is dropped by the next look once it is).
                link._client.loop_write()
                self._reconnect_at.pop(link, None)
                if link._client.socket() is None:
                    self._links.discard(link)

    def _register(self, link: SharedLoopLink, sock: Any) -> None:
        try:
            fd = sock.fileno()
        except OSError:
            return
        if fd < 0:
            return
        stale = self._sel.get_map().get(fd)
        if stale is not None:
            # The old socket's number was reused before its close reached the loop.
            self._sel.unregister(stale.fileobj)
        self._sel.register(sock, selectors.EVENT_READ, link)
        self._interest(link)

    def _unregister(self, sock: Any) -> None:
        try:
            self._sel.unregister(sock)
        except (KeyError, ValueError):
            pass  # never registered, or already replaced by a socket with the same number

    def _interest(self, link: SharedLoopLink) -> None:
        sock = link._client.socket()
        if sock is None:
            return
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if link._client.want_write() else 0)
        try:
            key = self._sel.get_key(sock)
        except (KeyError, ValueError):
            return
        if key.events != want:
            self._sel.modify(sock, want, link)

    def _watch(self, link: SharedLoopLink, now: float) -> None:
        """Schedule a reconnect of a dropped link after its jittered back-off."""
        if link._closing or not link._started or link._client.socket() is not None or link in self._reconnect_at:
            return
        lo, hi = link._backoff()
        self._reconnect_at[link] = now + random.uniform(lo, max(lo, min(hi, 2 * lo)))

    def _reconnect(self, link: SharedLoopLink) -> None:
        if link._closing or link not in self._links or link._client.socket() is not None:
            return
        try:
            link._client.reconnect()
        except OSError as exc:
            log.info("client %r: reconnect to %s failed (%s); retried", link.client_id, link.settings.url, exc)
            self._watch(link, time.monotonic())


class SharedLoopLink(MqttLink):
    """An :class:`MqttLink` driven by a shared :class:`NetworkLoop` instead of a thread of
    its own; same arguments plus ``loop``. Callback ``on_inbox`` (if set) is called on the
    loop's thread after each message put on :attr:`inbox`: an event-driven consumer
    schedules its work from it instead of blocking on the inbox."""

    def __init__(self, settings: BrokerSettings, client_id: str = "", *, loop: NetworkLoop,
                 **kwargs: Any) -> None:
        super().__init__(settings, client_id, **kwargs)
        self._loop = loop
        self.on_inbox: Callable[[], None] | None = None
        c = self._client
        c.on_socket_open = lambda client, userdata, sock: loop.command("open", self, sock)
        c.on_socket_close = lambda client, userdata, sock: loop.command("close_sock", self, sock)
        c.on_socket_register_write = lambda client, userdata, sock: loop.command("write", self)
        c.on_socket_unregister_write = lambda client, userdata, sock: None

    def _on_message(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        super()._on_message(client, userdata, msg)
        if self.on_inbox is not None:
            self.on_inbox()

    def _start_network(self) -> None:
        self._loop.command("add", self)

    def _stop_network(self) -> None:
        self._loop.command("release", self)
