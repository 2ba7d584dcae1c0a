"""One federation launcher: a broker, the coordinator and the devices, started on this machine.

Everything that starts a federation goes through here: ``fedmq demo`` (:mod:`fleet.demo`,
its command-line front), ``fedmq fleet`` (:mod:`fleet.cli`), the fault suite
(:mod:`benchmarks.faults`), the benchmarks that run federations (:mod:`benchmarks.simulation`,
``downlink``, ``privacy``, ``robust``, ``scale``, ``bridge``, ``scaffold``, ``secagg``) and the
tests' small fleets (tests/coordinator/downlink_fleet.py). The parts, each usable alone:

* **broker** (:func:`start_broker`, :class:`Broker`): the embedded amqtt broker, mosquitto
  (on a free loopback port), the in-memory bus (``memory://NAME``: devices must then be
  threads of this process) or the URL of a running broker;
* **configuration** (:func:`coordinator_options`, :func:`edge_options`,
  :func:`write_federation`): the coordinator's and each device's options, written once as
  the TOML files that ``fedmq coordinator run -c`` and ``python -m edge_client run -c`` read;
* **coordinator**: in this process (:func:`build_coordinator`, :func:`run_coordinator`) or
  as its own process (:class:`CoordinatorProcess`, ``fedmq coordinator run``);
* **devices**: one OS process each (:class:`DeviceProcesses`, exactly as on a fleet) or
  one thread each in this process (:class:`DeviceThreads`, the only way onto the in-memory
  bus); the virtual fleets of ``fedmq fleet`` (thousands of devices in worker processes)
  are :class:`fleet.fleet.Fleet`.

:class:`Federation` holds one of each and stops all of them, devices first, on every way
out (context manager). Nothing here decides a learning setting: callers pass the tables.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from fedmq.errors import ConfigError

log = logging.getLogger("fedmq.launch")

#: The project root: child processes import fedmq, coordinator and edge_client from here.
ROOT = Path(__file__).resolve().parent.parent
#: Seconds a device or coordinator process gets to leave after SIGTERM before SIGKILL.
STOP_GRACE_S = 10.0
#: Ways to stop a process: ``kill`` (SIGKILL, a crash) or ``term`` (SIGTERM, a clean stop).
STOP_MODES = ("kill", "term")
#: Where devices run.
DEVICE_MODES = ("processes", "threads")


# --------------------------------------------------------------------------- broker

@dataclass
class Broker:
    """The broker of one federation.

    Attributes:
        url: what coordinator and devices connect to (``mqtt://127.0.0.1:PORT``, ``memory://NAME``).
        protocol: MQTT protocol they speak to it: ``"5"`` or ``"3.1.1"``.
        process: the broker process this launcher started or was handed (anything with
            ``kill()``, ``stop()`` and ``start()``, e.g. :class:`broker.launch.MosquittoProcess`),
            None for a bus or a broker run by someone else.
        bus: name of the in-memory bus (``memory://`` only), dropped by :meth:`close`.
        kind: ``embedded``, ``mosquitto``, ``memory``, ``external`` or ``given``.
    """

    url: str
    protocol: str
    kind: str
    process: Any = None
    bus: str | None = None

    @property
    def in_memory(self) -> bool:
        return self.bus is not None

    def table(self) -> dict[str, str]:
        """The ``[broker]`` table of both configurations (url and protocol)."""
        return {"url": self.url, "protocol": self.protocol}

    def restart(self, mode: str) -> None:
        """SIGKILL (``kill``) or SIGTERM (``term``) the broker process, then start it again on
        the same port with the same persistence.

        Raises:
            ConfigError: no broker process to restart, or an unknown ``mode``.
        """
        if self.process is None or mode not in STOP_MODES:
            raise ConfigError(f"cannot {mode!r}-restart a {self.kind} broker ({self.url})")
        if mode == "kill":
            self.process.kill()
        else:
            self.process.stop()
        self.process.start()

    def close(self) -> None:
        """Kill the broker process (its persistence is not needed after a run) or drop the bus."""
        if self.process is not None:
            self.process.kill()
        if self.bus is not None:
            from fedmq.transport.memory import drop_bus

            drop_bus(self.bus)


def start_broker(where: str | None, work: Path, *, protocol: str = "5", mosquitto_conf: str = "",
                 mosquitto_security: str | None = None) -> Broker:
    """Start (or name) the broker of a federation.

    Args:
        where: None or ``"embedded"``: the embedded amqtt broker (MQTT 3.1.1) on a free
            loopback port, its log in ``work/broker``; ``"mosquitto"``: mosquitto (MQTT 5) in
            ``work/broker`` with ``mosquitto_conf`` appended to its configuration;
            ``"memory"`` (or ``memory://...``): a new in-memory bus; anything else: the URL of
            a running broker, spoken to with ``protocol``.
        work: the federation's folder.
        mosquitto_security: mosquitto's security section for its listener (``allow_anonymous``,
            ``password_file``, ``acl_file``, ...: ``conf_text`` of
            :func:`broker.launch.start_mosquitto`); None: anonymous clients allowed.

    Raises:
        BrokerLaunchError: the broker could not be started (the message has its log's tail).
    """
    if where is None or where == "embedded":
        from broker.launch import start_embedded

        proc = start_embedded(log_dir=work / "broker")
        return Broker(proc.url, proc.protocol, "embedded", process=proc)
    if where == "mosquitto":
        from broker.launch import start_mosquitto

        proc = start_mosquitto(work / "broker", extra_conf=mosquitto_conf, conf_text=mosquitto_security)
        return Broker(proc.url, proc.protocol, "mosquitto", process=proc)
    if where.startswith("memory"):
        bus = f"fed-{os.getpid()}-{time.monotonic_ns()}"
        return Broker(f"memory://{bus}", protocol, "memory", bus=bus)
    return Broker(where, protocol, "external")


def given_broker(process: Any, protocol: str = "5") -> Broker:
    """A broker started elsewhere (anything with ``url`` and ``kill()``; e.g. a cluster's
    handle), stopped with the federation."""
    return Broker(process.url, protocol, "given", process=process)


# --------------------------------------------------------------------------- configuration

def merge_tables(base: dict[str, Any], over: Mapping[str, Any] | None) -> dict[str, Any]:
    """``base`` with ``over`` laid on it: a table (dict) in both is merged key by key, any
    other value replaced. Neither argument is changed."""
    out = dict(base)
    for key, value in (over or {}).items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge_tables(out[key], value)
        else:
            out[key] = value
    return out


def coordinator_options(*, federation: str, task: str, broker: Broker, rounds: int, seed: int,
                        state_dir: str | Path, evaluation_data: str | Path | None = None,
                        publish_onnx: bool = True, **tables: Any) -> dict[str, Any]:
    """The coordinator's configuration (docs/coordinator.md) as a TOML document.

    Args:
        federation, task, rounds, seed, state_dir: the top-level options.
        broker: its ``[broker]`` table.
        evaluation_data: the held-out test set's file (``[evaluation] data``); None: none.
        publish_onnx: ``[publish] onnx``.
        tables: every other table or option as given (``round``, ``plan``, ``downlink``,
            ``server_optimizer``, ``privacy``, ``async``, ...), laid over the above
            (:func:`merge_tables`).
    """
    doc: dict[str, Any] = {"federation": federation, "task": task, "rounds": rounds, "seed": seed,
                           "state_dir": str(state_dir), "broker": broker.table(), "publish": {"onnx": publish_onnx}}
    if evaluation_data is not None:
        doc["evaluation"] = {"data": str(evaluation_data)}
    return merge_tables(doc, tables)


def edge_options(*, device_id: str, federation: str, task: str, broker: Broker, data: str | Path, seed: int,
                 state_dir: str | Path = "state", **options: Any) -> dict[str, Any]:
    """One device's configuration (docs/edge-client.md) as a TOML document; ``options``:
    every other option (``holdout_fraction``, ``receipt_timeout``, ``coordinator_key``, a
    ``broker`` table over the federation's ...), laid over the above."""
    doc = {"device_id": device_id, "federation": federation, "task": task, "data": str(data),
           "state_dir": str(state_dir), "seed": seed, "broker": broker.table()}
    return merge_tables(doc, options)


def write_toml(path: Path, doc: Mapping[str, Any]) -> Path:
    """Write ``doc`` as TOML to ``path`` (parents created); returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(dict(doc)), encoding="utf-8")
    return path


@dataclass(frozen=True)
class FederationFiles:
    """Where a federation's configuration lies: ``work/coordinator.toml`` and
    ``work/devices/<id>/edge.toml`` (each device's relative paths resolve in its folder)."""

    work: Path
    coordinator: Path
    devices: dict[str, Path]

    def device_folder(self, device: str) -> Path:
        return self.devices[device].parent


def write_federation(work: Path, coordinator: Mapping[str, Any] | None,
                     devices: Mapping[str, Mapping[str, Any]]) -> FederationFiles:
    """Write the coordinator's configuration (None: none, the caller runs its own) and every
    device's, as built by :func:`coordinator_options` and :func:`edge_options`."""
    coordinator_path = work / "coordinator.toml"
    if coordinator is not None:
        write_toml(coordinator_path, coordinator)
    paths = {device: write_toml(work / "devices" / device / "edge.toml", doc) for device, doc in devices.items()}
    return FederationFiles(work, coordinator_path, paths)


# --------------------------------------------------------------------------- processes

def child_env(**extra: str) -> dict[str, str]:
    """The environment of a coordinator or device process: this one's without test pause
    hooks (a child gets only those it is given), this project first on ``PYTHONPATH``, one
    torch thread, unbuffered output; then ``extra``."""
    env = {k: v for k, v in os.environ.items() if "TEST_PAUSE" not in k}
    env.update(PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def _spawn(command: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_file = open(log_path, "ab")  # noqa: SIM115 - the child keeps its own copy
    try:
        return subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)
    finally:
        log_file.close()


def stop_process(proc: subprocess.Popen[bytes] | None, mode: str = "term", timeout: float = STOP_GRACE_S) -> None:
    """SIGKILL (``kill``) or SIGTERM (``term``) ``proc`` and wait for it (SIGKILL after
    ``timeout`` seconds); nothing if it is None or has exited."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGKILL if mode == "kill" else signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class CoordinatorProcess:
    """The coordinator as its own process (``fedmq coordinator run -c PATH``), its output in
    ``coordinator.log`` beside the configuration."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.log_path = config.parent / "coordinator.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, **env: str) -> subprocess.Popen[bytes]:
        """Start it (again), with ``env`` over :func:`child_env`."""
        self.proc = _spawn([sys.executable, "-m", "fedmq.cli", "coordinator", "run", "-c", str(self.config)],
                           self.log_path, child_env(**env))
        return self.proc

    def stop(self, mode: str = "term") -> None:
        stop_process(self.proc, mode)

    def wait(self, until: float) -> bool:
        """Wait until it exits (True) or ``time.monotonic()`` passes ``until`` (False)."""
        if self.proc is None:
            return False
        try:
            self.proc.wait(timeout=max(0.1, until - time.monotonic()))
            return True
        except subprocess.TimeoutExpired:
            return False


class DeviceProcesses:
    """Edge clients as processes (``python -m edge_client run -c edge.toml``), exactly as on
    a fleet; each one's output in ``edge.log`` beside its configuration."""

    def __init__(self, configs: Mapping[str, Path]) -> None:
        self.configs = dict(configs)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, device: str, **env: str) -> None:
        """Start device ``device`` (again), with ``env`` over :func:`child_env`."""
        path = self.configs[device]
        self.procs[device] = _spawn([sys.executable, "-m", "edge_client", "run", "-c", str(path)],
                                    path.parent / "edge.log", child_env(**env))

    def start_all(self) -> None:
        for device in self.configs:
            self.start(device)

    def stop(self, device: str, mode: str = "term") -> None:
        stop_process(self.procs.get(device), mode)

    def exits(self) -> list[tuple[str, int]]:
        """Devices that have exited, with their status."""
        return [(d, p.returncode) for d, p in self.procs.items() if p.poll() is not None]

    def all_exited(self) -> bool:
        return bool(self.procs) and all(p.poll() is not None for p in self.procs.values())

    def close(self) -> None:
        """SIGTERM every device, then wait (SIGKILL after :data:`STOP_GRACE_S` seconds in all)."""
        procs = [p for p in self.procs.values() if p.poll() is None]
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for proc in procs:
            stop_process(proc, "term", max(0.1, deadline - time.monotonic()))


# --------------------------------------------------------------------------- threads

class DeviceThreads:
    """Edge agents as threads of this process, each with its own link, state folder and data;
    started and stopped one by one.

    Args:
        configs: device id -> its ``edge.toml`` (read with no environment: a thread must not
            pick up this process's ``FEDMQ_EDGE_*`` variables).
        agent_class: the agent to run (:class:`edge_client.agent.EdgeAgent` or a subclass
            that records what it does, as the tests' do).
    """

    def __init__(self, configs: Mapping[str, Path], agent_class: Any = None) -> None:
        from edge_client.agent import EdgeAgent

        self.configs = dict(configs)
        self.agent_class = agent_class if agent_class is not None else EdgeAgent
        self.agents: dict[str, Any] = {}
        self.errors: list[BaseException] = []
        self._threads: dict[str, tuple[threading.Thread, threading.Event]] = {}

    def _name(self, device: str | int) -> str:
        return list(self.configs)[device] if isinstance(device, int) else device

    def config(self, device: str | int, **extra: Any) -> Any:
        """Device ``device``'s :class:`~edge_client.config.EdgeConfig` (an id, or its index in
        ``configs``), with ``extra`` attributes over its file's.

        Raises:
            ConfigError: the file or an option in ``extra`` is invalid.
        """
        from edge_client.config import EdgeConfig, load_config

        cfg = load_config(self.configs[self._name(device)], environ={})
        return EdgeConfig.model_validate({**cfg.model_dump(), **extra}) if extra else cfg

    def start(self, device: str | int, **extra: Any) -> Any:
        """Start an agent for ``device`` (an id or an index) on a thread of its own, with
        ``extra`` options (:meth:`config`); returns the agent."""
        name = self._name(device)
        agent = self.agent_class(self.config(name, **extra), environ={})
        stop = threading.Event()

        def run() -> None:
            try:
                agent.run(stop)
            except BaseException as exc:  # noqa: BLE001 - kept in errors, seen through all_exited()
                self.errors.append(exc)
                log.error("device %s stopped: %s", name, exc)

        thread = threading.Thread(target=run, daemon=True, name=f"edge-{name}")
        thread.start()
        self.agents[name] = agent
        self._threads[name] = (thread, stop)
        return agent

    def start_all(self) -> None:
        for device in self.configs:
            self.start(device)

    def stop(self, device: str, timeout: float = 30.0) -> None:
        """Stop ``device``'s agent and wait for its thread.

        Raises:
            RuntimeError: the thread did not end within ``timeout`` seconds.
        """
        thread, stop = self._threads.pop(device)
        stop.set()
        thread.join(timeout=timeout)
        if thread.is_alive():
            raise RuntimeError(f"device {device} did not stop within {timeout:.0f} s")
        self._release(device)

    def _release(self, device: str) -> None:
        # An agent locks its state folder for the life of its process; a device that runs on
        # a thread must let go of it, so that it can start again in this process.
        self.agents[device]._state_lock.close()

    def stop_all(self) -> None:
        for device in list(self._threads):
            self.stop(device)

    def all_exited(self) -> bool:
        return bool(self._threads) and not any(t.is_alive() for t, _ in self._threads.values())

    def close(self) -> None:
        """Stop every agent; wait :data:`STOP_GRACE_S` seconds in all for their threads."""
        for _, stop in self._threads.values():
            stop.set()
        deadline = time.monotonic() + STOP_GRACE_S
        for device, (thread, _) in list(self._threads.items()):
            thread.join(timeout=max(0.1, deadline - time.monotonic()))
            if not thread.is_alive():
                del self._threads[device]
                self._release(device)


# --------------------------------------------------------------------------- coordinator here

def build_coordinator(config: Path, *, metrics: Any = None, environ: Mapping[str, str] | None = None) -> Any:
    """The coordinator of ``config`` (either round mode), built in this process.

    Args:
        metrics: its :class:`coordinator.metrics.CoordinatorMetrics` (None: its own).
        environ: environment overrides of the configuration (``FEDMQ_COORDINATOR__...``);
            None: this process's environment, as ``fedmq coordinator run`` reads it.

    Raises:
        ConfigError: the configuration is invalid.
    """
    from coordinator.service import make_coordinator
    from coordinator.config import load_config

    return make_coordinator(load_config(config, environ=environ), metrics=metrics)


def run_coordinator(coordinator: Any, progress: Callable[[Any], None] | None = None) -> Any:
    """Run ``coordinator`` to its end in this thread and return its result; SIGTERM (when
    this is the main thread) and Ctrl-C stop it cleanly (it checkpoints and closes its link)."""
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if in_main else None
    if in_main:
        signal.signal(signal.SIGTERM, lambda *_: coordinator.stop())
    try:
        return coordinator.run(progress_callback=progress)
    except KeyboardInterrupt:
        coordinator.stop()
        raise
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)


# --------------------------------------------------------------------------- a whole federation

@dataclass
class Federation:
    """A broker, the configuration files, the devices and (optionally) a coordinator process
    of one federation in ``files.work``; :meth:`close` stops whatever is running, devices
    first, then the coordinator, then the broker (context manager).

    Build one with :meth:`create`.
    """

    broker: Broker
    files: FederationFiles
    devices: DeviceProcesses | DeviceThreads
    coordinator: CoordinatorProcess = field(init=False)

    def __post_init__(self) -> None:
        self.coordinator = CoordinatorProcess(self.files.coordinator)

    @property
    def work(self) -> Path:
        return self.files.work

    @classmethod
    def create(cls, work: Path, broker: Broker, *, coordinator: Mapping[str, Any] | None,
              devices: Mapping[str, Mapping[str, Any]], devices_in: str = "processes",
              agent_class: Any = None) -> Federation:
        """Write the configuration into ``work`` and return the federation, nothing started
        yet but ``broker`` (which it now owns).

        Args:
            coordinator: the coordinator's configuration (:func:`coordinator_options`); None:
                the caller runs its own.
            devices: device id -> its configuration (:func:`edge_options`).
            devices_in: ``processes`` or ``threads`` (:data:`DEVICE_MODES`).
            agent_class: with ``threads``, the agent class (default the edge agent).

        Raises:
            ConfigError: unknown ``devices_in``, or processes on the in-memory bus.
        """
        if devices_in not in DEVICE_MODES:
            raise ConfigError(f"devices_in {devices_in!r}: expected one of {DEVICE_MODES}")
        if broker.in_memory and devices_in != "threads":
            raise ConfigError("the in-memory bus lives in this process: devices must run as threads")
        files = write_federation(work, coordinator, devices)
        runner: DeviceProcesses | DeviceThreads = (DeviceThreads(files.devices, agent_class)
                                                   if devices_in == "threads" else DeviceProcesses(files.devices))
        return cls(broker, files, runner)

    def device_exits(self) -> list[tuple[str, int]]:
        """Device processes that have exited, with their status (none for threads)."""
        return self.devices.exits() if isinstance(self.devices, DeviceProcesses) else []

    def close(self) -> None:
        try:
            self.devices.close()
            self.coordinator.stop()
        finally:
            self.broker.close()

    def __enter__(self) -> Federation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
