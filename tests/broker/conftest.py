"""Fixtures of the broker tests: a paho-mqtt peer that records everything on queues, and
a mosquitto run from the shipped broker/mosquitto.conf and broker/acl with accounts made
by the fedmq broker commands' own functions."""

from __future__ import annotations

import getpass
import queue
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from broker import credentials as cred
from broker.conf import BrokerDirs, render_mosquitto_conf
from broker.launch import MosquittoProcess, free_port, mosquitto_binary

#: Seconds any single wait on the broker may take before the test fails.
WAIT = 10.0
FED = "f1"


class Peer:
    """One MQTT client; paho callbacks only put events on queues (field notes)."""

    def __init__(self, port: int, user: str | None = None, password: str | None = None, *,
                 protocol: int = mqtt.MQTTv5, tls: dict[str, str] | None = None,
                 will: tuple[str, bytes] | None = None, client_id: str | None = None) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.port = port
        if client_id is None:
            client_id = f"{user or 'anon'}-{uuid.uuid4().hex[:8]}"
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
        if user is not None:
            self.client.username_pw_set(user, password)
        if tls is not None:
            self.client.tls_set(**tls)
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1, retain=True)
        self.client.on_connect = lambda c, u, flags, rc, props: self.events.put(("connect", (rc, props)))
        self.client.on_connect_fail = lambda c, u: self.events.put(("connect_fail", None))
        self.client.on_disconnect = lambda c, u, flags, rc, props: self.events.put(("disconnect", rc))
        self.client.on_subscribe = lambda c, u, mid, rcs, props: self.events.put(("suback", rcs))
        self.client.on_message = lambda c, u, msg: self.messages.put(msg)

    def connect(self) -> tuple[Any, Any]:
        """Connect and return the first (event, value): ("connect", (reason, properties)),
        ("disconnect", reason) or ("connect_fail", None). Automatic reconnects are stopped."""
        self.client.connect("127.0.0.1", self.port, keepalive=30)
        self.client.loop_start()
        kind, value = self.events.get(timeout=WAIT)
        if kind != "connect" or value[0].is_failure:
            self.close()
        return kind, value

    def connect_ok(self) -> Any:
        kind, value = self.connect()
        assert kind == "connect" and not value[0].is_failure, (kind, value)
        return value[1]

    def subscribe(self, *topics: str) -> list[Any]:
        self.client.subscribe([(t, 1) for t in topics])
        kind, value = self.events.get(timeout=WAIT)
        assert kind == "suback", (kind, value)
        return value

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(timeout=WAIT)
        assert info.is_published(), f"no PUBACK for {topic} within {WAIT} s"

    def until(self, topic: str, payload: bytes) -> list[mqtt.MQTTMessage]:
        """Messages received up to and including (topic, payload); fails after WAIT seconds."""
        seen = []
        while True:
            msg = self.messages.get(timeout=WAIT)
            seen.append(msg)
            if msg.topic == topic and msg.payload == payload:
                return seen

    def disconnects(self) -> list[Any]:
        """Reason codes of the disconnects seen so far (drains the event queue)."""
        seen = []
        while True:
            try:
                kind, value = self.events.get_nowait()
            except queue.Empty:
                return seen
            if kind == "disconnect":
                seen.append(value)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class Account:
    name: str
    password: str
    folder: Path

    def tls(self, *, cert: bool = True) -> dict[str, str]:
        files = {"ca_certs": str(self.folder / "ca.crt")}
        if cert:
            files.update(certfile=str(self.folder / "client.crt"), keyfile=str(self.folder / "client.key"))
        return files


@dataclass
class Deployment:
    """A mosquitto running the shipped configuration, and its accounts."""

    broker: MosquittoProcess
    plain_port: int
    tls_port: int
    dirs: BrokerDirs
    ca_dir: Path
    accounts: dict[str, Account]
    root: Path

    def peer(self, name: str | None, **kwargs: Any) -> Peer:
        account = self.accounts.get(name) if name else None
        tls = kwargs.pop("tls", None)
        port = self.tls_port if tls is not None else self.plain_port
        password = kwargs.pop("password", account.password if account else None)
        return Peer(port, name, password, tls=tls, **kwargs)


def make_account(name: str, role: str, *, passwd: Path, acl: Path, ca_dir: Path, root: Path,
                 federation: str = FED, hasher: str = "auto") -> Account:
    """What add-device / add-coordinator do, through the library functions they call;
    role ``reader`` is a device's read-only companion account (name ``DEVICE.predict``)."""
    folder = root / "accounts" / name
    password = cred.generate_password()
    cred.set_password(passwd, name, password, hasher=hasher)
    cred.issue_client_cert(ca_dir, name, folder / "client.crt", folder / "client.key")
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(cred.CaFiles(ca_dir).ca_cert, folder / "ca.crt")
    accounts = cred.read_acl(acl)
    if role == "coordinator":
        accounts.coordinators.setdefault(name, []).append(federation)
    elif role == "reader":
        accounts.readers.append(name)
    cred.write_acl(acl, accounts)
    return Account(name, password, folder)


def start_shipped_mosquitto(root: Path, setup: Callable[[Path, Path, Path], dict[str, Account]], *,
                            make_ca: bool = True, **render: Any) -> Deployment:
    """Lay out root/config like the docker image's /mosquitto/config, let ``setup(passwd,
    acl, ca_dir)`` add accounts (and make the CA in ca_dir when ``make_ca`` is False),
    render broker/mosquitto.conf for it (``render``: more arguments of
    :func:`render_mosquitto_conf`, such as ``tls_auth``) and start mosquitto."""
    dirs = BrokerDirs(root / "config", root / "data", root / "log")
    for folder in (dirs.config, dirs.data, dirs.log, dirs.certs):
        folder.mkdir(parents=True, exist_ok=True)
    ca_dir = root / "ca"
    if make_ca:
        cred.init_ca(ca_dir, ["localhost", "127.0.0.1"])
    accounts = setup(dirs.passwd, dirs.acl, ca_dir)
    for name in ("ca.crt", "server.crt", "server.key"):
        shutil.copyfile(ca_dir / name, dirs.certs / name)
    plain_port, tls_port = free_port(), free_port()
    conf = root / "mosquitto.conf"
    # Running as root, mosquitto would drop to user "mosquitto", which cannot read the
    # 0600 password file the test's user owns.
    conf.write_text(render_mosquitto_conf(dirs, plain_port=plain_port, tls_port=tls_port, run_as=getpass.getuser(),
                                         **render))
    # mosquitto opens its listeners in file order, the TLS one last: once it accepts, both do.
    broker = MosquittoProcess(root, tls_port, conf, mosquitto_binary())
    broker.start()
    return Deployment(broker, plain_port, tls_port, dirs, ca_dir, accounts, root)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("shipped-mosquitto")

    def setup(passwd: Path, acl: Path, ca_dir: Path) -> dict[str, Account]:
        common = {"passwd": passwd, "acl": acl, "ca_dir": ca_dir, "root": root}
        return {
            # One account per hasher, so both formats are proven against mosquitto.
            "coord": make_account("coord", "coordinator", hasher="fedmq", **common),
            "coord2": make_account("coord2", "coordinator", federation="f2", hasher="mosquitto_passwd", **common),
            "dev-a": make_account("dev-a", "device", hasher="mosquitto_passwd", **common),
            "dev-b": make_account("dev-b", "device", hasher="fedmq", **common),
        }

    dep = start_shipped_mosquitto(root, setup)
    yield dep
    dep.broker.kill()


@pytest.fixture(scope="module")
def identity_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """The shipped mosquitto with a coordinator ``coord`` of f1, devices ``dev-a`` and
    ``dev-b``, and ``dev-a.predict``, dev-a's read-only companion account."""
    root = tmp_path_factory.mktemp("identity")

    def setup(passwd: Path, acl: Path, ca_dir: Path) -> dict[str, Account]:
        common = {"passwd": passwd, "acl": acl, "ca_dir": ca_dir, "root": root}
        return {name: make_account(name, role, **common) for name, role in
                (("coord", "coordinator"), ("dev-a", "device"), ("dev-b", "device"), ("dev-a.predict", "reader"))}

    dep = start_shipped_mosquitto(root, setup)
    yield dep
    dep.broker.kill()


@pytest.fixture
def peers() -> Iterator[Callable[..., Peer]]:
    """``peers(peer)`` registers a Peer to close after the test; ``peers(port, user,
    password, **kwargs)`` makes one (see :class:`Peer`) and registers it."""
    opened: list[Peer] = []

    def keep(first: Peer | int, *args: Any, **kwargs: Any) -> Peer:
        peer = first if isinstance(first, Peer) else Peer(first, *args, **kwargs)
        opened.append(peer)
        return peer

    yield keep
    for peer in opened:
        peer.close()


@pytest.fixture
def shipped_mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Deployment]]:
    """``shipped_mosquitto(setup, **render)``: :func:`start_shipped_mosquitto` in a new
    folder, killed after the test."""
    started: list[Deployment] = []

    def start(setup: Callable[[Path, Path, Path], dict[str, Account]], *, make_ca: bool = True,
              **render: Any) -> Deployment:
        dep = start_shipped_mosquitto(tmp_path_factory.mktemp("shipped-mosquitto"), setup, make_ca=make_ca,
                                      **render)
        started.append(dep)
        return dep

    yield start
    for dep in started:
        dep.broker.kill()
