"""The clocks of the device agent's loop: systemd watchdog pings, the online status again after
every reconnect, long work (fetching, training) on a worker thread while the loop keeps
pinging, and the back-off when another agent keeps taking this device id's connection.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeVar

from edge_client.connection import Connection
from edge_client.duplicate import TakeoverWatch
from edge_client.sdnotify import Notifier
from edge_client.secure_rounds import SecureRounds
from edge_client.settlement import Settlement

log = logging.getLogger("edge_client.agent")

#: Longest wait of the main loop between two looks at its clocks, seconds.
TICK = 1.0

T = TypeVar("T")


class _Worker:
    """Runs one call on a daemon thread so the main loop stays free to ping the watchdog
    (a daemon thread: a stop request never waits for local training to end)."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.started = time.monotonic()
        self._done: queue.SimpleQueue[tuple[bool, Any]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True, name="edge-worker")
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self._done.put((True, fn()))
        except BaseException as exc:  # handed to the main thread, which decides
            self._done.put((False, exc))

    def wait(self, timeout: float) -> tuple[bool, Any] | None:
        try:
            return self._done.get(timeout=timeout)
        except queue.Empty:
            return None


class Heartbeat:
    """What the agent's loop does on its clocks, between and during its work.

    Args:
        conn: the connection (its link's state and reconnects).
        notifier: systemd's notify socket (watchdog pings, status lines).
        settlement: asked to resend the update in flight after a reconnect.
        secure: secure rounds (their messages are handled on every tick; their tick is short).
        takeovers: how takeovers of the connection are judged (edge_client.duplicate).
        counters: ``duplicate_id`` (reports and back-offs).
        device: this device's id (for the log).
    """

    def __init__(self, conn: Connection, notifier: Notifier, settlement: Settlement, secure: SecureRounds,
                 takeovers: TakeoverWatch, counters: Counter[str], device: str) -> None:
        self.conn, self.notifier, self.settlement, self.secure = conn, notifier, settlement, secure
        self.takeovers, self.counters, self.device = takeovers, counters, device
        self._last_ping = 0.0
        self._connects_seen = 0

    def connected(self) -> None:
        """The session's link just connected (the status it publishes at start is enough)."""
        self._connects_seen = self.conn.link.connects

    def wait_s(self) -> float:
        """How long the loop may wait for a message before its clocks need a look, seconds."""
        return min(self.secure.tick_s(TICK), self.notifier.watchdog_interval or TICK)

    def tick(self, worker: _Worker | None = None, limit: float = math.inf) -> None:
        """Ping the watchdog if the link is up and the worker (if any) is within its time
        limit; republish the online status after a reconnect (the broker published our last
        will when the link dropped), and with no worker running, resend the update in flight."""
        link = self.conn.link
        self.secure.drain()
        healthy = link.connected and (worker is None or time.monotonic() - worker.started <= limit)
        interval = self.notifier.watchdog_interval
        if healthy and interval is not None and time.monotonic() - self._last_ping >= interval:
            self.notifier.watchdog()
            self._last_ping = time.monotonic()
        if link.connected and link.connects != self._connects_seen:
            self._connects_seen = link.connects
            self.conn.publish_status()
            if worker is None:
                self.settlement.after_reconnect()

    def in_worker(self, fn: Callable[[], T], limit: float, stop: threading.Event) -> T | None:
        """Run ``fn`` off the loop thread, pinging the watchdog while it stays within
        ``limit`` seconds. Returns None when stop was requested first; re-raises its error."""
        worker = _Worker(fn)
        while True:
            outcome = worker.wait(self.wait_s())
            if outcome is not None:
                ok, value = outcome
                if ok:
                    return value
                raise value
            if stop.is_set():
                return None
            self.tick(worker, limit)

    def check_takeovers(self, stop: threading.Event) -> None:
        """Report the broker closing this connection again and again right after accepting it
        (edge_client.duplicate): another agent has this device id; back off so that it runs.

        Raises:
            TransportError: the broker cannot be reached again after the back-off.
        """
        link = self.conn.link
        verdict = self.takeovers.observe(link.taken_over + link.short_lived, time.monotonic())
        if verdict is None:
            return
        dev = self.device
        self.counters["duplicate_id"] += 1
        if verdict == "report":
            log.error("device %s: the broker keeps closing this connection right after accepting it: most likely "
                      "another agent is configured with device id %r (the broker closes the older of two "
                      "connections with one client id, in turn); give every device its own device_id and broker "
                      "account", dev, dev)
            return
        pause = self.takeovers.backoff_s()
        log.error("device %s: device id in use by another agent (connection closed 3 times within %.0f s): backing "
                  "off %.0f s so that the other one runs, then connecting again; give every device its own "
                  "device_id and broker account (this agent is instance %s)", dev, self.takeovers.window_s, pause,
                  self.conn.instance)
        self.notifier.status(f"backing off {pause:.0f} s: device id {dev} in use by another agent")
        link.close()
        end = time.monotonic() + pause
        while not stop.is_set() and time.monotonic() < end:
            stop.wait(min(TICK, end - time.monotonic()))
            if self.notifier.watchdog_interval is not None:
                self.notifier.watchdog()  # waiting on purpose, not hung
        if not stop.is_set():
            link.connect()
