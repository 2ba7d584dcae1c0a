"""Start a real RabbitMQ cluster with its MQTT plugin on loopback, for tests and benchmarks.

Every node runs from Debian's ``rabbitmq-server`` package (``/usr/lib/rabbitmq/bin``,
installed by ``./run.sh test`` like mosquitto) under a private folder: its own node name,
AMQP, distribution and MQTT ports, Mnesia and log folders, configuration file and Erlang
cookie, and one private ``epmd`` port for the whole cluster, so that nothing is shared with
a system RabbitMQ or another cluster. The first node boots alone; the others find it through
``classic_config`` peer discovery and join. A definitions file loaded at boot gives every
node the same users, permissions, topic permissions and policies.

A missing RabbitMQ is an error (:class:`~broker.launch.BrokerLaunchError`), never a reason to
skip. RabbitMQ 3.10 (Debian 12) speaks MQTT 3.1.1 only: clients connect with ``protocol =
"3.1.1"``. What fedmq relies on across its nodes is in docs/scale.md.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.launch import LOOPBACK, BrokerLaunchError, free_port

#: Where Debian's package puts the scripts that run a node as the calling user.
RABBITMQ_BIN = Path(os.environ.get("FEDMQ_RABBITMQ_BIN", "/usr/lib/rabbitmq/bin"))
#: Seconds a node gets to boot (and join the cluster) before its MQTT listener must accept.
NODE_START_TIMEOUT = 90.0
#: The erlang cookie of test clusters (nodes and rabbitmqctl must share it).
TEST_COOKIE = "FEDMQTESTCLUSTERCOOKIE"


@dataclass
class RabbitNode:
    """One node: its Erlang name, ports and (while it runs) its process group."""

    index: int
    name: str
    mqtt_port: int
    amqp_port: int
    dist_port: int
    folder: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``mqtt://127.0.0.1:PORT`` of the node's MQTT listener."""
        return f"mqtt://{LOOPBACK}:{self.mqtt_port}"


@dataclass
class RabbitCluster:
    """A RabbitMQ cluster on loopback, started by :func:`start_rabbitmq_cluster`.

    Attributes:
        nodes: the nodes, node 0 first (the one the others joined).
        folder: the cluster's private folder (configuration, Mnesia, logs, cookie).
        epmd_port: the private Erlang port mapper port of every node.
    """

    nodes: list[RabbitNode]
    folder: Path
    epmd_port: int
    definitions: dict[str, Any] = field(default_factory=dict)
    epmd: subprocess.Popen[bytes] | None = None

    def env(self, node: RabbitNode) -> dict[str, str]:
        """Environment of ``node``'s server (and of rabbitmqctl aimed at it)."""
        home = self.folder / "home"
        env = {k: v for k, v in os.environ.items() if not k.startswith("RABBITMQ_")}
        env.update({
            "HOME": str(home), "ERL_EPMD_PORT": str(self.epmd_port),
            "RABBITMQ_NODENAME": node.name, "RABBITMQ_NODE_IP_ADDRESS": LOOPBACK,
            "RABBITMQ_NODE_PORT": str(node.amqp_port), "RABBITMQ_DIST_PORT": str(node.dist_port),
            "RABBITMQ_CONFIG_FILE": str(node.folder / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.folder / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": str(self.folder / "rabbitmq-env.conf"),
            "RABBITMQ_MNESIA_BASE": str(node.folder / "mnesia"), "RABBITMQ_LOG_BASE": str(node.folder / "log"),
            "RABBITMQ_PID_FILE": str(node.folder / "rabbit.pid"),
            "RABBITMQ_PLUGINS_EXPAND_DIR": str(node.folder / "plugins-expand"),
        })
        return env

    def start(self, node: RabbitNode) -> None:
        """Start ``node``'s server (a new process group) without waiting for it."""
        log = open(node.folder / "server.out", "ab")  # noqa: SIM115 - the child keeps its copy
        node.proc = subprocess.Popen([str(RABBITMQ_BIN / "rabbitmq-server")], env=self.env(node), stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()

    def wait(self, node: RabbitNode, timeout: float = NODE_START_TIMEOUT) -> None:
        """Return once ``node``'s MQTT listener accepts TCP connections.

        Raises:
            BrokerLaunchError: the node exited or did not listen within ``timeout`` seconds
                (the message carries the tail of its output).
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if node.proc is None or node.proc.poll() is not None:
                break
            try:
                with socket.create_connection((LOOPBACK, node.mqtt_port), timeout=1.0):
                    return
            except OSError:
                time.sleep(0.2)
        raise BrokerLaunchError(f"RabbitMQ node {node.name} did not listen for MQTT on port {node.mqtt_port} "
                                f"within {timeout:.0f} s: {self.tail(node)}")

    def tail(self, node: RabbitNode, lines: int = 15) -> str:
        """The last lines of the node's console output."""
        try:
            return " | ".join((node.folder / "server.out").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no output)"

    def kill(self, index: int) -> None:
        """SIGKILL node ``index`` (its whole process group: the Erlang VM and its helpers)."""
        node = self.nodes[index]
        if node.proc is None or node.proc.poll() is not None:
            return
        os.killpg(node.proc.pid, signal.SIGKILL)
        node.proc.wait()

    def ctl(self, index: int, *args: str, timeout: float = 60.0) -> str:
        """Run ``rabbitmqctl -n NODE ARGS`` against node ``index``; its standard output.

        Raises:
            BrokerLaunchError: rabbitmqctl failed (message with its output)."""
        node = self.nodes[index]
        proc = subprocess.run([str(RABBITMQ_BIN / "rabbitmqctl"), "-n", node.name, *args], env=self.env(node),
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise BrokerLaunchError(f"rabbitmqctl {' '.join(args)} on {node.name}: {proc.stdout} {proc.stderr}")
        return proc.stdout

    def start_epmd(self) -> None:
        """Start the cluster's own epmd on its private port (the nodes then use it rather
        than starting a daemon that would outlive them).

        Raises: BrokerLaunchError when epmd is missing or does not listen within 10 s."""
        epmd = shutil.which("epmd") or "/usr/lib/erlang/bin/epmd"
        if not Path(epmd).exists():
            raise BrokerLaunchError("epmd (Erlang) is not installed: apt-get install rabbitmq-server")
        self.epmd = subprocess.Popen([epmd, "-port", str(self.epmd_port), "-address", LOOPBACK],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and self.epmd.poll() is None:
            try:
                with socket.create_connection((LOOPBACK, self.epmd_port), timeout=1.0):
                    return
            except OSError:
                time.sleep(0.1)
        raise BrokerLaunchError(f"epmd did not listen on port {self.epmd_port}")

    def stop(self) -> None:
        """Kill every node and the cluster's epmd; the folder stays (logs)."""
        for node in self.nodes:
            self.kill(node.index)
        if self.epmd is not None and self.epmd.poll() is None:
            self.epmd.kill()
            self.epmd.wait()

    def __enter__(self) -> RabbitCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _node_conf(node: RabbitNode, first: RabbitNode, definitions: Path) -> str:
    return "\n".join([
        f"listeners.tcp.default = {LOOPBACK}:{node.amqp_port}",
        f"mqtt.listeners.tcp.default = {LOOPBACK}:{node.mqtt_port}",
        "mqtt.allow_anonymous = false",
        # Loopback only, so guest may log in (rabbitmqctl and the definitions use it).
        "loopback_users = none",
        f"load_definitions = {definitions}",
        "cluster_formation.peer_discovery_backend = classic_config",
        f"cluster_formation.classic_config.nodes.1 = {first.name}",
        f"cluster_formation.classic_config.nodes.2 = {node.name}",
        "cluster_formation.randomized_startup_delay_range.min = 0",
        "cluster_formation.randomized_startup_delay_range.max = 0",
        # A node that loses its peers keeps serving (one machine, no partitions to heal).
        "cluster_partition_handling = ignore",
        "log.console = false",
        "log.file.level = info",
        "",
    ])


def start_rabbitmq_cluster(folder: Path, *, nodes: int = 3, definitions: dict[str, Any] | None = None,
                           timeout: float = NODE_START_TIMEOUT) -> RabbitCluster:
    """Start ``nodes`` clustered RabbitMQ nodes with the MQTT plugin, each on free loopback
    ports, and return once every MQTT listener accepts connections.

    Args:
        folder: a private folder for the cluster (created).
        nodes: how many nodes (1 to 9).
        definitions: RabbitMQ definitions (``users``, ``vhosts``, ``permissions``,
            ``topic_permissions``, ``policies``) every node loads at boot; None: the user
            ``guest`` (password ``guest``) with full rights on vhost ``/``.
        timeout: seconds each node gets to boot and join.

    Raises:
        BrokerLaunchError: RabbitMQ is not installed, or a node failed to start or join.
    """
    if not (RABBITMQ_BIN / "rabbitmq-server").exists():
        raise BrokerLaunchError(f"RabbitMQ is not installed ({RABBITMQ_BIN / 'rabbitmq-server'} missing): "
                                "apt-get install rabbitmq-server (./run.sh test does)")
    folder.mkdir(parents=True, exist_ok=True)
    home = folder / "home"
    home.mkdir(exist_ok=True)
    cookie = home / ".erlang.cookie"
    cookie.write_text(TEST_COOKIE)
    cookie.chmod(0o400)
    (folder / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
    (folder / "rabbitmq-env.conf").write_text("")
    defs = definitions or {
        "users": [{"name": "guest", "password": "guest", "tags": ["administrator"]}],
        "vhosts": [{"name": "/"}],
        "permissions": [{"user": "guest", "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"}]}
    defs_path = folder / "definitions.json"
    defs_path.write_text(json.dumps(defs))
    members = []
    for i in range(nodes):
        node_folder = folder / f"node{i}"
        node_folder.mkdir(exist_ok=True)
        members.append(RabbitNode(i, f"fedmq{i}@localhost", free_port(), free_port(), free_port(), node_folder))
    cluster = RabbitCluster(members, folder, free_port(), defs)
    for node in members:
        (node.folder / "rabbitmq.conf").write_text(_node_conf(node, members[0], defs_path))
    try:
        cluster.start_epmd()
        cluster.start(members[0])
        cluster.wait(members[0], timeout)
        for node in members[1:]:
            cluster.start(node)
        for node in members[1:]:
            cluster.wait(node, timeout)
    except BaseException:
        cluster.stop()
        raise
    return cluster
