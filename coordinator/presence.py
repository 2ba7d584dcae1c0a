"""Presence: a registry of devices built from their retained status and last will.

Devices publish a retained :class:`fedmq.wire.messages.Status` on ``fedmq/F/status/D`` when
they come online and set the same topic as their last will (``online=False``), so the
broker tells the coordinator when a device drops off. The coordinator subscribes at
start and gets every retained status at once. Only the round thread touches a
registry (MQTT callbacks only enqueue), so it needs no lock.

**Duplicate device ids.** Every agent run puts a random ``instance`` id in its status. A
restarted device shows a new instance that replaces the old one for good. Two agents
configured with one device id close each other's connection in turn (the id is the MQTT
client id), so their statuses take turns: an instance that comes back after another
replaced it, within :data:`DUPLICATE_WINDOW_S`, flags the device (:class:`Conflict`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from fedmq.wire.messages import Status

log = logging.getLogger("fedmq.coordinator")

#: Seconds within which an instance id coming back after another means two agents.
DUPLICATE_WINDOW_S = 600.0
#: Seconds between two reports (log line, database row) of one device's conflict.
REPORT_INTERVAL_S = 30.0


@dataclass
class Device:
    """What the coordinator knows about one device.

    Attributes:
        device: id (one topic level).
        online: last status said online (a last will sets it False).
        task, spec_hash: the task and ParamSpec hash the device trains.
        samples: local training samples it advertised.
        software: software version string it advertised.
        last_seen: wall-clock seconds since the epoch of the last message from it.
        rounds: rounds it had an update accepted in.
        bytes_up: bytes of client-update blobs received from it (manifest included).
        instance: the agent run its last status came from ("" from older agents).
    """

    device: str
    online: bool = False
    task: str = ""
    spec_hash: str = ""
    samples: int = 0
    software: str = ""
    last_seen: float = 0.0
    rounds: int = 0
    bytes_up: int = 0
    instance: str = ""


@dataclass
class Conflict:
    """A device id used by more than one agent at once.

    Attributes:
        device: the device id.
        instances: the agents' instance ids seen taking turns, sorted.
        first_seen, last_seen: wall-clock seconds since the epoch of the first and latest turn.
        turns: times an instance came back after another replaced it.
    """

    device: str
    instances: list[str] = field(default_factory=list)
    first_seen: float = 0.0
    last_seen: float = 0.0
    turns: int = 0
    _reported: float = field(default=-1.0, repr=False, compare=False)


class DeviceRegistry:
    """Devices by id, fed with statuses; knows which are eligible for a round and which
    ids two agents share (:attr:`conflicts`).

    Args:
        max_devices: most devices kept; a status from a new device beyond it first evicts
            the offline device seen longest ago (none offline: the new one is refused), so
            a flood of statuses from made-up ids cannot grow the registry without bound.
    """

    def __init__(self, max_devices: int = 10_000) -> None:
        self.devices: dict[str, Device] = {}
        self.conflicts: dict[str, Conflict] = {}
        self._instances: dict[str, dict[str, float]] = {}   # device -> instance -> last seen
        self.max_devices = max_devices
        self.refused = 0

    def restore(self, device: Device) -> None:
        """Put back a device loaded from the database (offline until its status arrives)."""
        device.online = False
        self.devices[device.device] = device

    def on_status(self, topic_device: str, status: Status, now: float | None = None) -> Device | None:
        """Apply a status received on the topic of ``topic_device``.

        A status whose ``device`` field differs from the topic's device level is ignored
        (a device speaks only for itself): returns ``None``.
        """
        if status.device != topic_device:
            return None
        dev = self.devices.get(topic_device)
        if dev is None:
            if len(self.devices) >= self.max_devices and not self._evict_one():
                self.refused += 1
                return None
            dev = self.devices[topic_device] = Device(topic_device)
        now = time.time() if now is None else now
        self._track_instance(dev, status.instance, now)
        dev.online = status.online
        if status.online or status.spec_hash:
            dev.task, dev.spec_hash = status.task, status.spec_hash
            dev.samples, dev.software = status.samples, status.software
        dev.last_seen = now
        return dev

    def _track_instance(self, dev: Device, instance: str, now: float) -> None:
        if not instance:
            return
        seen = self._instances.setdefault(dev.device, {})
        for old in [i for i, t in seen.items() if now - t > DUPLICATE_WINDOW_S]:
            del seen[old]
        previous = dev.instance
        returning = bool(previous) and instance != previous and instance in seen
        seen[instance] = now
        dev.instance = instance
        if not returning:
            return
        conflict = self.conflicts.get(dev.device)
        if conflict is None:
            conflict = self.conflicts[dev.device] = Conflict(dev.device, first_seen=now)
        conflict.instances = sorted(set(conflict.instances) | {instance, previous})
        conflict.last_seen = now
        conflict.turns += 1

    def conflict_reports(self, now: float | None = None) -> list[Conflict]:
        """Conflicts new or changed and not reported for REPORT_INTERVAL_S: each is logged
        (a warning naming the device and its instances) and marked reported."""
        now = time.time() if now is None else now
        out = []
        for c in self.conflicts.values():
            if c.last_seen > c._reported and now - c._reported >= REPORT_INTERVAL_S:
                c._reported = now
                log.warning("device %s: %d agents are using this device id (instances %s take turns, %d times "
                            "since %s): each closes the other's connection; give every device its own device_id",
                            c.device, len(c.instances), ", ".join(c.instances), c.turns,
                            time.strftime("%H:%M:%S", time.localtime(c.first_seen)))
                out.append(c)
        return out
    def _evict_one(self) -> bool:
        offline = [d for d in self.devices.values() if not d.online]
        if not offline:
            return False
        del self.devices[min(offline, key=lambda d: d.last_seen).device]
        return True

    def on_cleared(self, topic_device: str) -> None:
        """The retained status was cleared (empty payload): the device is gone."""
        dev = self.devices.get(topic_device)
        if dev is not None:
            dev.online = False

    def seen(self, device: str, now: float | None = None) -> None:
        dev = self.devices.get(device)
        if dev is not None:
            dev.last_seen = time.time() if now is None else now

    def eligible(self, task: str, spec_hash: str) -> list[str]:
        """Ids of online devices training ``task`` with ParamSpec ``spec_hash``, sorted."""
        return sorted(d.device for d in self.devices.values()
                      if d.online and d.spec_hash == spec_hash and d.task == task)

    def online_count(self) -> int:
        return sum(1 for d in self.devices.values() if d.online)
