"""Thousands of virtual devices per worker process: a shared network loop and event-driven agent steps.

With ``network = "shared"`` (docs/scale.md) a worker process does not give each virtual
device its own two threads (the agent's loop and paho's network loop). Instead:

* every device's MQTT connection is a :class:`fedmq.transport.netloop.SharedLoopLink`, all of
  them driven by one :class:`fedmq.transport.netloop.NetworkLoop` thread;
* every device is the real :class:`edge_client.agent.EdgeAgent`, driven by its
  :meth:`~edge_client.agent.EdgeAgent.start` / :meth:`~edge_client.agent.EdgeAgent.step` /
  :meth:`~edge_client.agent.EdgeAgent.finish` from a pool of ``step_threads`` threads: a
  device is stepped when a message arrives on its inbox (the network loop's ``on_inbox``)
  and every ``tick_s`` seconds (its clocks: resends after ``receipt_timeout``, the status
  after a reconnect, the deadline's grace). A step that runs a round blocks its pool thread
  while the model is fetched and the device trains (and for the simulated compute time),
  so ``step_threads`` bounds how many devices of one process train at once.

The same device code settles every update (in flight, receipt, resend, rollback, durable
state); only the threads differ. Not supported in this mode (refused by the fleet file's
validation): availability periods (``online_fraction`` < 1) and dropout mid-training.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

import numpy as np

from fedmq.errors import FedmqError, TransportError

log = logging.getLogger("fedmq.fleet")

#: Most agent steps one turn of a device takes before its pool thread serves another device.
STEPS_PER_TURN = 64


class _Driven:
    """A virtual device and its scheduling state (guarded by the stepper's lock)."""

    __slots__ = ("dev", "started", "done", "scheduled", "dirty", "retry_at")

    def __init__(self, dev: Any) -> None:
        self.dev = dev
        self.started = False
        self.done = False
        self.scheduled = False
        self.dirty = False
        self.retry_at = 0.0


class Stepper:
    """Drives the agents of many :class:`fleet.fleet.VirtualDevice` from ``threads`` threads.

    Args:
        devices: virtual devices built with a shared network loop (not yet started).
        threads: pool threads that run agent steps (>= 1).
        tick_s: seconds between two steps of an idle device (its clocks).
        stop: set to stop (then call :meth:`close`).
    """

    def __init__(self, devices: list[Any], threads: int, tick_s: float, stop: threading.Event) -> None:
        self.stop = stop
        self.tick_s = tick_s
        self._lock = threading.Lock()
        self._ready: queue.SimpleQueue[_Driven | None] = queue.SimpleQueue()
        self.driven = [_Driven(d) for d in devices]
        for item in self.driven:
            item.dev.wake = self._waker(item)
        self._pool = [threading.Thread(target=self._serve, daemon=True, name=f"fleet-step-{i}")
                      for i in range(threads)]
        for t in self._pool:
            t.start()
        self._ticker = threading.Thread(target=self._tick, daemon=True, name="fleet-tick")
        self._ticker.start()

    def _waker(self, item: _Driven) -> Any:
        return lambda: self.schedule(item)

    def schedule(self, item: _Driven) -> None:
        """Have a pool thread take a turn of ``item`` (once more if it is being served now)."""
        with self._lock:
            if item.done:
                return
            if item.scheduled:
                item.dirty = True
                return
            item.scheduled = True
        self._ready.put(item)

    def start_device(self, n: int) -> None:
        """Connect device ``n`` (on a pool thread)."""
        self.schedule(self.driven[n])

    def _tick(self) -> None:
        while not self.stop.wait(self.tick_s):
            now = time.monotonic()
            for item in self.driven:
                if item.started or (item.retry_at and item.retry_at <= now):
                    self.schedule(item)

    def _serve(self) -> None:
        while True:
            item = self._ready.get()
            if item is None:
                return
            try:
                self._turn(item)
            except Exception:  # a device's failure must not take the pool thread with it
                log.exception("%s: agent step failed; device stopped", item.dev.profile.device)
                item.done = True
            with self._lock:
                if item.dirty and not item.done:
                    item.dirty = False
                    self._ready.put(item)
                else:
                    item.scheduled = False
                    item.dirty = False

    def _turn(self, item: _Driven) -> None:
        dev = item.dev
        if self.stop.is_set() or dev.session.is_set():
            return
        if not item.started:
            if item.retry_at > time.monotonic():
                return
            self._start(item)
            return
        agent = dev.agent
        try:
            for _ in range(STEPS_PER_TURN):
                if dev.session.is_set() or not agent.step(dev.session, 0.0):
                    break
        except FedmqError as exc:
            log.error("%s: %s; device stopped", dev.profile.device, exc)
            item.done = True
            agent.finish()

    def _start(self, item: _Driven) -> None:
        dev = item.dev
        if item.retry_at:
            dev.renew_link()
        dev.log.sessions += 1
        try:
            dev.agent.start(dev.session)
        except TransportError as exc:
            dev.log.connect_failures += 1
            log.warning("%s: %s", dev.profile.device, exc)
            dev.agent.link.close()
            item.retry_at = time.monotonic() + 1.0 + 9.0 * float(np.random.default_rng().random())  # jittered
            return
        item.retry_at = 0.0
        item.started = True
        self.schedule(item)  # messages that came with the subscription

    def close(self, timeout: float = 20.0) -> None:
        """After ``stop``: end every device's session, wait for the pool, and let every
        started agent publish its offline status and close its link."""
        for item in self.driven:
            item.dev.session.set()
        for _ in self._pool:
            self._ready.put(None)
        end = time.monotonic() + timeout
        for t in self._pool:
            t.join(timeout=max(0.0, end - time.monotonic()))
        for item in self.driven:
            if item.started and not item.done:
                item.done = True
                try:
                    item.dev.agent.finish()
                except FedmqError as exc:
                    log.warning("%s: %s", item.dev.profile.device, exc)
            item.dev.returned.set()
