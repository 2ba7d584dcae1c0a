"""``fedmq fleet``: many virtual devices, each the real edge agent, against a real broker.

A fleet of ``devices`` virtual devices runs in ``processes`` worker processes
(``python -m fleet.fleet worker SPEC INDEX``; device ``i`` lives in worker ``i % processes``).
Every virtual device is an unchanged :class:`edge_client.agent.EdgeAgent` on its own thread,
with its own MQTT connection (client id = device id), its own state folder and its own
local data; one process holds hundreds of them, sharing the interpreter, torch and the
task code. Torch runs one thread per process. With ``network = "shared"`` the same agents
are driven event by event from a few threads, and their connections by one network loop
per process (fleet/stepper.py): thousands per process.

Heterogeneity (:class:`Heterogeneity`, every draw seeded by ``seed`` and the device's index,
so a fleet is the same fleet on every run):

* compute speed: a device needs ``compute_s * slowdown`` seconds per local training, with
  ``slowdown = exp(N(0, speed_sigma))`` (log-normal, median 1); the time real training took
  is topped up with a wait on the training worker (:attr:`EdgeAgent.pace`);
* availability: online and offline periods drawn from exponential distributions with
  means ``mean_online_s`` and ``mean_online_s * (1 - online_fraction) / online_fraction``;
  the first period is online with probability ``online_fraction``. Going offline is a
  clean leave (retained offline status);
* dropout mid-training: with probability ``dropout`` a training ends with the device dying
  part way through (its last will is published, :meth:`fleet.netsim.ShapedLink.vanish`);
  it comes back after an offline period of mean ``rejoin_s`` seconds, from its state folder;
* uplink: ``bandwidth`` bytes/s (median; log-normal with ``bandwidth_sigma``) and
  ``latency_s`` per message (:class:`fleet.netsim.ShapedLink`);
* data: ``samples_per_device`` samples each, IID or label-skewed (``partition =
  "dirichlet"``: class shares drawn from Dirichlet(``alpha``) per device);
* Byzantine devices (``[adversary]``, :mod:`fleet.adversary`): a seeded fraction poisons
  its data or its client updates; each is still the real agent with its own connection.

Workers print one JSON line of statistics every ``stats_interval_s`` seconds (devices
connected, counters, RSS and PSS of the process) and write ``worker-<index>.json`` (every
device's trainings, counters and bytes) when stopped (SIGTERM / SIGINT).
"""

from __future__ import annotations

import heapq
import json
import logging
import math
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fleet.adversary import Adversary, byzantine_indices, poison_data, poison_update

from fedmq.storage.atomic import atomic_write_text
from fedmq.errors import ConfigError, FedmqError
from fedmq.config.settings_file import read_toml

log = logging.getLogger("fedmq.fleet")

ROOT = Path(__file__).resolve().parent.parent
#: Seconds a virtual device waits for its broker's CONNACK before it retries.
CONNECT_TIMEOUT_S = 120.0
#: Most devices one worker process holds with ``network = "threads"``: paho's select() sees
#: only file descriptors below 1024, and a device holds about 4 (its socket, paho's wake-up
#: pair, its state lock).
MAX_THREADED_PER_PROCESS = 240


def min_processes(devices: int) -> int:
    """Fewest worker processes that hold ``devices`` with ``network = "threads"``."""
    return max(1, -(-devices // MAX_THREADED_PER_PROCESS))
#: Seconds between two steps of an idle agent with ``network = "shared"`` (its clocks: resends,
#: status after a reconnect); a message on its inbox steps it at once.
TICK_S = 2.0
_STARTED = time.monotonic()


class Heterogeneity(BaseModel):
    """How virtual devices differ (module docstring); defaults: a homogeneous, always-online fleet."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    compute_s: float = Field(0.0, ge=0)
    speed_sigma: float = Field(0.0, ge=0, le=5)
    online_fraction: float = Field(1.0, gt=0, le=1)
    mean_online_s: float = Field(600.0, gt=0)
    dropout: float = Field(0.0, ge=0, le=1)
    rejoin_s: float = Field(30.0, gt=0)
    bandwidth: float = Field(10e6, gt=0)
    bandwidth_sigma: float = Field(0.0, ge=0, le=5)
    latency_s: float = Field(0.0, ge=0)

    @property
    def mean_offline_s(self) -> float:
        return self.mean_online_s * (1.0 - self.online_fraction) / self.online_fraction


class FleetSpec(BaseModel):
    """A fleet: where it connects, how many devices, their data and heterogeneity.

    Attributes:
        broker_url: the broker every device connects to (``mqtt://host:port``).
        federation, task: as in the edge configuration (``digits-logreg``, ``digits-mlp``,
            ``mnist-cnn`` ...).
        devices: number of virtual devices (>= 1); processes: worker processes (>= 1).
        data: ``digits`` or ``mnist10k`` (the train split; ``mnist10k`` needs the shared data).
        samples_per_device: local samples per device, drawn without replacement from the
            train split (a device's draw depends on the seed and its index).
        partition: ``iid`` (uniform draw) or ``dirichlet`` (label skew: the device's class
            shares ~ Dirichlet(``alpha``), Hsu et al. 2019, then its samples per class drawn
            from that class).
        seed: seed of every draw. prefix: device ids are ``<prefix>-<index>``.
        work_dir: folder of the devices' data and state, worker logs and results.
        connect_spread_s: devices start spread uniformly over this many seconds (None:
            ``devices / 100``), so the broker is not hit by a connect storm.
        stats_interval_s: seconds between two statistics lines of a worker.
        edge: extra edge options for every device (docs/edge-client.md), e.g.
            ``{"receipt_timeout": 10}``.
        credentials_dir: None (anonymous), or a folder with ``<device id>/username`` and
            ``<device id>/password`` for each device (its broker account).
        heterogeneity: :class:`Heterogeneity`.
        network: ``threads`` (each device: its agent's thread and paho's network thread;
            about 3,000 devices per machine) or ``shared`` (fleet/stepper.py: one network
            loop per worker process and event-driven agent steps on ``step_threads``
            threads; ten thousand devices; no availability periods or dropout).
        step_threads: pool threads per worker process that step agents (``shared``).
        adversary: :class:`fleet.adversary.Adversary` (``[adversary]``: Byzantine devices).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    broker_url: str
    federation: str
    task: str = "digits-logreg"
    devices: int = Field(ge=1)
    processes: int = Field(4, ge=1, le=256)
    data: str = "digits"
    samples_per_device: int = Field(32, ge=2)
    partition: Literal["iid", "dirichlet"] = "iid"
    alpha: float = Field(0.5, gt=0)
    seed: int = 0
    prefix: str = "vd"
    work_dir: Path
    connect_spread_s: float | None = Field(None, ge=0)
    stats_interval_s: float = Field(2.0, gt=0)
    edge: dict[str, Any] = Field(default_factory=dict)
    credentials_dir: Path | None = None
    heterogeneity: Heterogeneity = Heterogeneity()
    network: str = Field("threads", pattern="^(threads|shared)$")
    step_threads: int = Field(16, ge=1, le=256)

    @model_validator(mode="after")
    def _shared_supports(self) -> FleetSpec:
        h = self.heterogeneity
        if self.network == "shared" and (h.online_fraction < 1.0 or h.dropout > 0):
            raise ValueError("network = 'shared' runs always-online devices: set heterogeneity.online_fraction = 1 "
                             "and dropout = 0, or use network = 'threads'")
        per_process = -(-self.devices // self.processes)
        if self.network == "threads" and per_process > MAX_THREADED_PER_PROCESS:
            # Measured: 1,000 devices in 2 workers connected 346 and the rest kept timing out at
            # the broker, with nothing in the workers' logs.
            raise ValueError(
                f"{self.devices} devices in {self.processes} worker processes is {per_process} per process, over "
                f"{MAX_THREADED_PER_PROCESS}: with network = 'threads' each device's paho loop waits with select(), "
                f"which cannot watch file descriptors above 1024 (a device holds about 4); use processes >= "
                f"{min_processes(self.devices)} or network = 'shared'")
        return self
    adversary: Adversary = Adversary()

    def device_id(self, index: int) -> str:
        return f"{self.prefix}-{index:05d}"

    @property
    def spread_s(self) -> float:
        return self.devices / 100.0 if self.connect_spread_s is None else self.connect_spread_s

    @property
    def byzantine(self) -> frozenset[int]:
        """Indices of the Byzantine devices (:func:`fleet.adversary.byzantine_indices`)."""
        return byzantine_indices(self.adversary, self.devices, self.seed)


def load_fleet_spec(path: str | os.PathLike[str], overrides: dict[str, Any] | None = None) -> FleetSpec:
    """Read a fleet TOML file (the :class:`FleetSpec` fields, ``[heterogeneity]``,
    ``[adversary]`` and ``[edge]`` tables) and apply ``overrides``.

    Raises:
        ConfigError: unreadable file or invalid option (names the file and option).
    """
    raw = read_toml(Path(path)) if path is not None else {}
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return FleetSpec.model_validate(raw)
    except ValidationError as exc:
        lines = [f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in exc.errors()]
        raise ConfigError(f"invalid fleet configuration ({path or 'options'}):\n  " + "\n  ".join(lines)) from None


# -- the seeded fleet --------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceProfile:
    """One virtual device's fixed traits: ``slowdown`` (x nominal compute time),
    ``bandwidth`` (uplink bytes/s), ``latency_s`` (seconds per message)."""

    index: int
    device: str
    slowdown: float
    bandwidth: float
    latency_s: float


def device_profiles(spec: FleetSpec) -> list[DeviceProfile]:
    """Every device's traits, a pure function of ``spec.seed`` and the heterogeneity."""
    h = spec.heterogeneity
    rng = np.random.default_rng([int(spec.seed), 1])
    slow = np.exp(rng.normal(0.0, h.speed_sigma, spec.devices)) if h.speed_sigma > 0 else np.ones(spec.devices)
    bw = h.bandwidth * (np.exp(rng.normal(0.0, h.bandwidth_sigma, spec.devices)) if h.bandwidth_sigma > 0
                        else np.ones(spec.devices))
    return [DeviceProfile(i, spec.device_id(i), float(slow[i]), float(bw[i]), h.latency_s) for i in range(spec.devices)]


def availability(spec: FleetSpec, index: int) -> Iterator[tuple[bool, float]]:
    """Device ``index``'s periods: ``(online, seconds)`` forever (always online: one
    infinite online period). Seeded by ``(seed, index)``."""
    h = spec.heterogeneity
    rng = np.random.default_rng([int(spec.seed), 2, index])
    if h.online_fraction >= 1.0:
        while True:  # online again after a dropout or a failed connect
            yield True, math.inf
    online = bool(rng.random() < h.online_fraction)
    first = True
    while True:
        mean = h.mean_online_s if online else h.mean_offline_s
        seconds = float(rng.exponential(mean))
        if first:
            # The fleet starts at a random instant of the first period (a renewal process in steady state).
            seconds *= float(rng.random())
            first = False
        yield online, seconds
        online = not online


def dropout_draws(spec: FleetSpec, index: int) -> Iterator[tuple[bool, float, float]]:
    """Per training of device ``index``: ``(dies, fraction of the training done when it
    dies, offline seconds after)``, seeded by ``(seed, index)``."""
    h = spec.heterogeneity
    rng = np.random.default_rng([int(spec.seed), 3, index])
    while True:
        yield bool(rng.random() < h.dropout), float(rng.random()), float(rng.exponential(h.rejoin_s))


def prepare(spec: FleetSpec) -> Path:
    """Write every device's local data (``work_dir/devices/<id>/data.npz``), the held-out
    test set (``work_dir/test.npz``) and the spec (``work_dir/fleet.json``); return the spec path.

    Raises:
        ConfigError: unknown data set, or more samples per device than the train split has.
        DataError: the data set cannot be read.
    """
    from fedmq.data import load_split, save_npz_atomic

    if spec.data not in ("digits", "mnist10k"):
        raise ConfigError(f"fleet data {spec.data!r}: expected 'digits' or 'mnist10k'")
    x_tr, y_tr, x_te, y_te = load_split(spec.data)
    if spec.samples_per_device > len(y_tr):
        raise ConfigError(f"samples_per_device {spec.samples_per_device} exceeds the {len(y_tr)} training samples "
                          f"of {spec.data}")
    work = spec.work_dir
    classes = int(y_tr.max()) + 1
    by_class = [np.flatnonzero(y_tr == c) for c in range(classes)]
    byzantine = spec.byzantine
    for i in range(spec.devices):
        folder = work / "devices" / spec.device_id(i)
        if (folder / "data.npz").is_file():
            continue
        rng = np.random.default_rng([int(spec.seed), 4, i])
        if spec.partition == "dirichlet":
            counts = rng.multinomial(spec.samples_per_device, rng.dirichlet(np.full(classes, spec.alpha)))
            idx = np.concatenate([rng.choice(by_class[c], n, replace=n > len(by_class[c]))
                                  for c, n in enumerate(counts)])
        else:
            idx = rng.choice(len(y_tr), spec.samples_per_device, replace=False)
        x, y = x_tr[idx], y_tr[idx]
        if i in byzantine:
            x, y = poison_data(spec.adversary, x, y, classes, rng)
        save_npz_atomic(folder / "data.npz", x, y)
    save_npz_atomic(work / "test.npz", x_te, y_te)
    path = work / "fleet.json"
    atomic_write_text(path, spec.model_dump_json(indent=1))
    return path


def raise_nofile(want: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards ``want`` (at most the hard limit);
    children (the broker, the workers) inherit it. Returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def memory_kib(pid: int | str = "self") -> dict[str, int]:
    """``rss`` and ``pss`` of a process in KiB (``/proc/PID/smaps_rollup``), {} when unreadable."""
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss"):
                out[key.lower()] = int(rest.split()[0])
    except (OSError, ValueError):
        return {}
    return out


def cpu_seconds(pid: int | str = "self") -> float:
    """User + system CPU seconds of a process (``/proc/PID/stat``), NaN when unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return math.nan


# -- the worker process ------------------------------------------------------------------


class _Timers:
    """One thread that sets events at given times (a process holds hundreds of devices)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, threading.Event]] = []
        self._cond = threading.Condition()
        self._n = 0
        threading.Thread(target=self._run, daemon=True, name="fleet-timers").start()

    def set_at(self, when: float, event: threading.Event) -> None:
        with self._cond:
            self._n += 1
            heapq.heappush(self._heap, (when, self._n, event))
            self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                while self._heap and self._heap[0][0] <= now:
                    heapq.heappop(self._heap)[2].set()
                self._cond.wait(None if not self._heap else self._heap[0][0] - now)


@dataclass
class _DeviceLog:
    trainings: list[tuple[int, float, bool]] = field(default_factory=list)  # (task round, device-seconds, died)
    sessions: int = 0
    dropouts: int = 0
    connect_failures: int = 0


class VirtualDevice:
    """One virtual device: its agent, its periods online and offline, its dropouts."""

    def __init__(self, spec: FleetSpec, profile: DeviceProfile, timers: _Timers | None, stop: threading.Event,
                 netloop: Any = None) -> None:
        from edge_client.agent import EdgeAgent
        from edge_client.config import EdgeConfig

        self.spec, self.profile, self.timers, self.stop = spec, profile, timers, stop
        #: The worker's shared network loop (``network = "shared"``), else None; ``wake`` is
        #: called on it when a message arrives (fleet/stepper.py schedules the agent's step).
        self.netloop = netloop
        self.wake: Callable[[], None] | None = None
        folder = spec.work_dir / "devices" / profile.device
        options = dict(receipt_timeout=15.0, receipt_grace=10.0, keepalive=30, fetch_timeout=60.0)
        options.update(spec.edge)
        if spec.credentials_dir is not None:
            options.update(username_file=spec.credentials_dir / profile.device / "username",
                           password_file=spec.credentials_dir / profile.device / "password")
        self.cfg = EdgeConfig(broker_url=spec.broker_url, device_id=profile.device, federation=spec.federation,
                              task=spec.task, data=folder / "data.npz", state_dir=folder / "state",
                              seed=profile.index, torch_threads=1, **options)
        self.session = threading.Event()
        self.returned = threading.Event()
        self.link = self._new_link()
        self.agent = EdgeAgent(self.cfg, link=self.link, environ={})  # type: ignore[arg-type]
        self.agent.pace = self._pace
        self.byzantine = profile.index in spec.byzantine
        self.log = _DeviceLog()
        self._drops = dropout_draws(spec, profile.index)
        self._offline_after_drop = 0.0

    def _new_link(self) -> Any:
        from edge_client.agent import broker_settings
        from fedmq.transport import open_link
        from fleet.netsim import ShapedLink

        # A loaded host takes seconds to answer hundreds of CONNECTs; the agent's default
        # (10 s) would fail them and a retry storm would follow.
        settings = broker_settings(self.cfg).with_(connect_timeout=CONNECT_TIMEOUT_S)
        if self.netloop is not None:
            from fedmq.transport.netloop import SharedLoopLink

            inner = SharedLoopLink(settings, client_id=self.cfg.device_id, loop=self.netloop)
            inner.on_inbox = lambda: self.wake() if self.wake is not None else None
            return ShapedLink(inner, bandwidth=self.profile.bandwidth, latency_s=self.profile.latency_s,
                              stop=self.session)
        return ShapedLink(open_link(settings, client_id=self.cfg.device_id),
                          bandwidth=self.profile.bandwidth, latency_s=self.profile.latency_s, stop=self.session)

    @property
    def connected(self) -> bool:
        return bool(self.agent.link.connected) and not self.session.is_set()

    def _pace(self, task_message: Any, result: Any) -> None:
        # task_message: the wire message (fedmq.wire.messages.RoundTask) that asked for this training.
        seconds = self.spec.heterogeneity.compute_s * self.profile.slowdown
        dies, part, offline = next(self._drops)
        if dies:
            self.session.wait(max(0.0, seconds * part - result.seconds))
            self.log.trainings.append((task_message.round, seconds * part, True))
            self.log.dropouts += 1
            self._offline_after_drop = offline
            self.agent.link.vanish()
            self.session.set()
            # The agent must never send what this training produced: hold the worker until
            # the agent's loop has ended.
            self.returned.wait()
            return
        if self.byzantine:
            poison_update(self.spec.adversary, result.update)
        spent = max(seconds, result.seconds)
        self.log.trainings.append((task_message.round, spent, False))
        # Reported with the update (envelope metrics), so the coordinator's records say how
        # much device time each accepted update cost.
        result.metrics["device_seconds"] = spent
        self.session.wait(max(0.0, seconds - result.seconds))

    def run(self) -> None:
        from fedmq.errors import TransportError

        periods = availability(self.spec, self.profile.index)
        first = True
        while not self.stop.is_set():
            online, seconds = next(periods)
            if not online:
                self.stop.wait(seconds)
                continue
            if not first:
                self.session = threading.Event()
                self.renew_link()
            first = False
            self.returned.clear()
            if math.isfinite(seconds):
                self.timers.set_at(time.monotonic() + seconds, self.session)
            self.log.sessions += 1
            try:
                self.agent.run(self.session)
            except TransportError as exc:
                self.log.connect_failures += 1
                log.warning("%s: %s", self.profile.device, exc)
                self.agent.link.close()
                self.stop.wait(1.0 + 9.0 * np.random.default_rng().random())  # jittered retry
            finally:
                self.returned.set()
            if self._offline_after_drop > 0:
                self.stop.wait(self._offline_after_drop)
                self._offline_after_drop = 0.0

    def renew_link(self) -> None:
        """A new connection for the next session."""
        from fedmq.transport.counting import CountingLink

        self.link = self._new_link()
        # The agent counts what its link carries (bytes_down of its updates): the new
        # connection adds to the same counters.
        self.agent.link = CountingLink(self.link, self.agent.link.traffic)

    def results(self) -> dict[str, Any]:
        return {"device": self.profile.device, "profile": asdict(self.profile), "byzantine": self.byzantine,
                "counters": dict(self.agent.counters),
                "trainings": self.log.trainings, "sessions": self.log.sessions, "dropouts": self.log.dropouts,
                "connect_failures": self.log.connect_failures, "bytes_sent": self.link.bytes_sent}


def worker_main(spec_path: str, index: int) -> int:
    """Run the devices of worker ``index`` until SIGTERM / SIGINT; see the module docstring."""
    import torch

    torch.set_num_threads(1)
    spec = FleetSpec.model_validate_json(Path(spec_path).read_text())
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format=f"ts=%(asctime)s worker={index} level=%(levelname)s logger=%(name)s msg=%(message)s")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    mine = [p for p in device_profiles(spec) if p.index % spec.processes == index]
    stepper = None
    if spec.network == "shared":
        from fedmq.transport.netloop import NetworkLoop
        from fleet.stepper import Stepper

        netloop = NetworkLoop()
        devices = [VirtualDevice(spec, p, None, stop, netloop) for p in mine]
        stepper = Stepper(devices, spec.step_threads, TICK_S, stop)
    else:
        timers = _Timers()
        devices = [VirtualDevice(spec, p, timers, stop) for p in mine]
    built = time.monotonic() - _STARTED
    threads = []
    spread = spec.spread_s
    start = time.monotonic()
    for n, dev in enumerate(devices):
        delay = start + spread * (n / max(1, len(devices))) - time.monotonic()
        if delay > 0 and stop.wait(delay):
            break
        if stepper is not None:
            stepper.start_device(n)
            continue
        t = threading.Thread(target=dev.run, daemon=True, name=dev.profile.device)
        t.start()
        threads.append(t)

    def stats(final: bool = False) -> dict[str, Any]:
        counters: dict[str, int] = {}
        for d in devices:
            for k, v in d.agent.counters.items():
                counters[k] = counters.get(k, 0) + v
        return {"worker": index, "devices": len(devices), "connected": sum(d.connected for d in devices),
                "threads": threading.active_count(),
                "dropouts": sum(d.log.dropouts for d in devices), "counters": counters,
                "cpu_s": cpu_seconds(), "build_s": round(built, 3), **memory_kib(), "final": final}

    while not stop.wait(spec.stats_interval_s):
        print(json.dumps(stats()), flush=True)
    if stepper is not None:
        stepper.close()
    for d in devices:
        d.session.set()
    end = time.monotonic() + 20.0
    for t in threads:
        t.join(timeout=max(0.0, end - time.monotonic()))
    atomic_write_text(spec.work_dir / f"worker-{index}.json",
                      json.dumps({"stats": stats(True), "devices": [d.results() for d in devices]}))
    print(json.dumps(stats(True)), flush=True)
    return 0


# -- the parent: start, watch, stop ------------------------------------------------------


class Fleet:
    """The worker processes of one fleet (context manager: :meth:`stop` on exit).

    Args:
        spec: the fleet. :meth:`start` writes its data (:func:`prepare`) and starts the workers.
    """

    def __init__(self, spec: FleetSpec) -> None:
        self.spec = spec
        self.procs: list[subprocess.Popen[str]] = []
        self.latest: dict[int, dict[str, Any]] = {}
        self._cond = threading.Condition()
        self._readers: list[threading.Thread] = []

    def start(self) -> Fleet:
        """Prepare the data and start the workers (each inherits this process's limits).

        Raises:
            ConfigError / DataError: from :func:`prepare`.
        """
        spec_path = prepare(self.spec)
        raise_nofile(self.spec.devices + 1024)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                   OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        for i in range(self.spec.processes):
            errlog = open(self.spec.work_dir / f"worker-{i}.log", "ab")  # noqa: SIM115 - the child keeps a copy
            try:
                proc = subprocess.Popen([sys.executable, "-m", "fleet.fleet", "worker", str(spec_path), str(i)],
                                        stdout=subprocess.PIPE, stderr=errlog, text=True, env=env, cwd=str(ROOT))
            finally:
                errlog.close()
            self.procs.append(proc)
            reader = threading.Thread(target=self._read, args=(i, proc), daemon=True)
            reader.start()
            self._readers.append(reader)
        return self

    def _read(self, index: int, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                stats = json.loads(line)
            except json.JSONDecodeError:
                continue
            with self._cond:
                self.latest[index] = stats
                self._cond.notify_all()

    def connected(self) -> int:
        """Devices connected at the workers' last report."""
        with self._cond:
            return sum(s.get("connected", 0) for s in self.latest.values())

    def wait_connected(self, n: int, timeout: float) -> bool:
        """Wait until at least ``n`` devices report connected; False after ``timeout`` seconds
        or when a worker exited."""
        with self._cond:
            return self._cond.wait_for(
                lambda: sum(s.get("connected", 0) for s in self.latest.values()) >= n
                or any(p.poll() is not None for p in self.procs), timeout) and self.connected() >= n

    def wait_totals(self, predicate: Callable[[dict[str, Any]], bool], timeout: float) -> bool:
        """Wait until ``predicate(self.totals())`` holds at a worker report (True), or
        ``timeout`` seconds pass (False)."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self._totals()), timeout)

    def totals(self) -> dict[str, Any]:
        with self._cond:
            return self._totals()

    def _totals(self) -> dict[str, Any]:
        """Sums over the workers' last reports: connected, dropouts, counters, rss/pss (KiB), cpu_s."""
        reports = list(self.latest.values())
        out: dict[str, Any] = {"workers": len(reports), "connected": 0, "dropouts": 0, "rss": 0, "pss": 0,
                               "cpu_s": 0.0, "counters": {}}
        for r in reports:
            for key in ("connected", "dropouts", "rss", "pss", "cpu_s"):
                out[key] += r.get(key, 0)
            for k, v in r.get("counters", {}).items():
                out["counters"][k] = out["counters"].get(k, 0) + v
        return out

    def stop(self, timeout: float = 60.0) -> list[dict[str, Any]]:
        """SIGTERM every worker, wait for them (SIGKILL after ``timeout`` s) and return every
        device's results (from ``worker-<i>.json``; devices of a killed worker are missing)."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        end = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for r in self._readers:
            r.join(timeout=5.0)
        results: list[dict[str, Any]] = []
        for i in range(len(self.procs)):
            path = self.spec.work_dir / f"worker-{i}.json"
            if path.is_file():
                results.extend(json.loads(path.read_text())["devices"])
        self.procs = []
        return results

    def __enter__(self) -> Fleet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.procs:
            self.stop()


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "worker":
        return worker_main(argv[1], int(argv[2]))
    print("usage: python -m fleet.fleet worker SPEC.json INDEX", file=sys.stderr)
    return 2


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except FedmqError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
