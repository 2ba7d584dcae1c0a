"""Start real MQTT brokers on free loopback ports: mosquitto and the embedded amqtt broker.

Used by the tests (fixtures in tests/conftest.py), the benchmarks and the demo. Both
launchers return a handle with the same methods (``port``, ``url``, ``protocol``,
``stop()``, ``restart()``, ``kill()``, context manager) and return only once the broker
accepts TCP connections, or raise :class:`BrokerLaunchError` with the tail of its log.
A missing mosquitto binary is an error, never a reason to skip.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedmq.errors import FedmqError

#: Seconds a broker gets to accept connections after it is started.
START_TIMEOUT = 15.0
#: Seconds a broker gets to exit after SIGTERM before it is killed.
STOP_TIMEOUT = 10.0
LOOPBACK = "127.0.0.1"



def terminate(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM ``proc`` and wait up to ``timeout`` seconds, then SIGKILL it; nothing if it
    has already exited."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()

class BrokerLaunchError(FedmqError):
    """A broker binary is missing, or the broker exited or did not listen in time."""


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port on ``host`` that is free now (the OS picks it; another process could take
    it before the broker binds it, which the launchers report as a start failure)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def mosquitto_binary() -> str:
    """Path of the mosquitto binary: ``$FEDMQ_MOSQUITTO``, else ``mosquitto`` on PATH, else
    /usr/sbin/mosquitto (Debian installs it outside a normal user's PATH).

    Raises:
        BrokerLaunchError: none of these exists.
    """
    override = os.environ.get("FEDMQ_MOSQUITTO")
    if override:
        if not Path(override).is_file():
            raise BrokerLaunchError(f"FEDMQ_MOSQUITTO={override!r} is not a file: expected the mosquitto binary")
        return override
    found = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
    if not found:
        raise BrokerLaunchError("mosquitto binary not found (PATH, /usr/sbin, /usr/local/sbin): install mosquitto "
                                "2.x (apt-get install mosquitto) or set FEDMQ_MOSQUITTO to its path")
    return found


def _log_tail(path: Path, limit: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return "(no log)"


def _wait_accepting(proc: subprocess.Popen[bytes], host: str, port: int, timeout: float, log: Path,
                    what: str) -> None:
    """Return once ``host:port`` accepts a TCP connection; raise if ``proc`` exits first or the
    deadline passes. Between attempts it waits on the process itself, so an early exit is
    seen at once."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            pass
        if proc.poll() is not None:
            raise BrokerLaunchError(f"{what} exited with status {proc.returncode} before listening on "
                                    f"{host}:{port}; log {log}:\n{_log_tail(log)}")
        if time.monotonic() >= deadline:
            proc.kill()
            proc.wait()
            raise BrokerLaunchError(f"{what} did not accept connections on {host}:{port} within {timeout:.0f} s; "
                                    f"log {log}:\n{_log_tail(log)}")
        try:
            proc.wait(timeout=0.05)
        except subprocess.TimeoutExpired:
            pass


class _BrokerProcess:
    """A broker running as a child process on a fixed loopback port."""

    protocol: str  # MQTT protocol the broker speaks best: "5" or "3.1.1"
    name: str

    def __init__(self, port: int, log_path: Path) -> None:
        self.host = LOOPBACK
        self.port = port
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Broker URL for :class:`fedmq.transport.BrokerSettings`, e.g. ``mqtt://127.0.0.1:41234``."""
        return f"mqtt://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _spawn(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps its own copy
        try:
            self._proc = subprocess.Popen(self._command(), stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, cwd=self._cwd())
        finally:
            log.close()
        _wait_accepting(self._proc, self.host, self.port, START_TIMEOUT, self.log_path, self.name)

    def _cwd(self) -> str | None:
        return None

    def stop(self) -> None:
        """SIGTERM and wait (mosquitto saves its persistence file); kill after STOP_TIMEOUT s.
        Does nothing if already stopped."""
        if self._proc is not None:
            terminate(self._proc)

    def kill(self) -> None:
        """SIGKILL, as a crash: nothing is saved. Does nothing if already stopped."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.kill()
        proc.wait()

    def start(self) -> None:
        """Start the broker again (after stop or kill) on the same port with the same state folder.

        Raises:
            BrokerLaunchError: it exited or did not listen within START_TIMEOUT seconds.
        """
        if self.running():
            return
        self._spawn()

    def restart(self) -> None:
        """:meth:`stop` then :meth:`start`: same port, same configuration and persistence."""
        self.stop()
        self.start()

    def __enter__(self):  # noqa: ANN204 - returns the subclass
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(port={self.port}, pid={self.pid}, running={self.running()})"


class MosquittoProcess(_BrokerProcess):
    """mosquitto 2.x run with a generated configuration file in ``workdir``."""

    protocol = "5"
    name = "mosquitto"

    def __init__(self, workdir: Path, port: int, conf_path: Path, binary: str) -> None:
        super().__init__(port, workdir / "mosquitto.log")
        self.workdir = workdir
        self.conf_path = conf_path
        self._binary = binary

    def _command(self) -> list[str]:
        return [self._binary, "-c", str(self.conf_path)]


def mosquitto_conf(workdir: Path, port: int, *, extra_conf: str = "", conf_text: str | None = None) -> str:
    """The configuration :func:`start_mosquitto` writes (see there)."""
    head = [
        f"listener {port} {LOOPBACK}",
        "persistence true",
        f"persistence_location {workdir}/",
        f"log_dest file {workdir / 'mosquitto.log'}",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
        # Running as root, mosquitto drops to user "mosquitto", which cannot write workdir.
        f"user {getpass.getuser()}",
    ]
    if conf_text is None:
        body = "allow_anonymous true"
    else:
        body = conf_text.replace("{workdir}", str(workdir)).replace("{port}", str(port))
    return "\n".join(head) + "\n" + body.rstrip("\n") + "\n" + extra_conf.rstrip("\n") + "\n"


def start_mosquitto(workdir: Path, *, port: int | None = None, extra_conf: str = "",
                    conf_text: str | None = None) -> MosquittoProcess:
    """Start mosquitto on ``127.0.0.1:port`` and return once it accepts connections.

    The configuration written to ``workdir/mosquitto.conf`` is: a listener on the port,
    persistence in ``workdir`` (``mosquitto.db``, saved on stop and restart), a log in
    ``workdir/mosquitto.log``; then ``conf_text`` if given (the security section:
    ``password_file``, ``acl_file``, ``allow_anonymous``, TLS options, which then apply to
    this listener; ``{workdir}`` and ``{port}`` in it are replaced), else
    ``allow_anonymous true``; then ``extra_conf`` (e.g. ``max_packet_size 65536``).

    Args:
        workdir: folder for the configuration, persistence and log (created if missing).
        port: TCP port; a free one when None.

    Raises:
        BrokerLaunchError: mosquitto is not installed, or it exited or did not listen within
            START_TIMEOUT seconds (the message has the tail of its log).
    """
    binary = mosquitto_binary()
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    port = port if port is not None else free_port()
    conf_path = workdir / "mosquitto.conf"
    conf_path.write_text(mosquitto_conf(workdir, port, extra_conf=extra_conf, conf_text=conf_text))
    broker = MosquittoProcess(workdir, port, conf_path, binary)
    broker.start()
    return broker


class EmbeddedBrokerProcess(_BrokerProcess):
    """The embedded amqtt broker (:mod:`broker.embedded`, MQTT 3.1.1) in a child Python
    process. Its retained messages and sessions live in memory: a restart loses them."""

    protocol = "3.1.1"
    name = "embedded broker"

    def _command(self) -> list[str]:
        return [sys.executable, "-m", "broker.embedded", "--host", self.host, "--port", str(self.port)]

    def _cwd(self) -> str:
        # So that `-m broker.embedded` resolves even when fedmq is not installed.
        return str(Path(__file__).resolve().parent.parent)


def start_embedded(port: int | None = None, *, log_dir: Path | None = None) -> EmbeddedBrokerProcess:
    """Start the embedded broker (``python -m broker.embedded``) on ``127.0.0.1:port`` in a
    child process and return once it accepts connections.

    Args:
        port: TCP port; a free one when None.
        log_dir: folder for ``embedded-broker.log``; a new temporary folder when None.

    Raises:
        BrokerLaunchError: it exited or did not listen within START_TIMEOUT seconds.
    """
    port = port if port is not None else free_port()
    folder = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="fedmq-embedded-"))
    folder.mkdir(parents=True, exist_ok=True)
    broker = EmbeddedBrokerProcess(port, folder / "embedded-broker.log")
    broker.start()
    return broker
