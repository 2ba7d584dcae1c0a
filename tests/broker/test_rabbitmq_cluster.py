"""What fedmq relies on, checked across the nodes of a real RabbitMQ cluster (docs/scale.md,
"A RabbitMQ cluster").

Three RabbitMQ 3.10 nodes with the MQTT plugin (Debian's ``rabbitmq-server``) clustered on
loopback by :func:`broker.rabbitmq.start_rabbitmq_cluster`; devices connect to nodes 0 and 1,
the coordinator to node 2. What holds across nodes: QoS 1 order, last wills, per-user topic
permissions, persistent sessions (surviving the death of their node only under a mirroring
policy). What does not: retained messages stay on the node that took them (and RabbitMQ
3.10 sends them only to exact topic filters), so a device on another node never finds the
global model, which the retained-model test shows; fedmq runs there only with the
coordinator's ``broker.retain_urls`` (tests/broker/test_rabbitmq_federation.py).
"""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from broker.rabbitmq import RabbitCluster, start_rabbitmq_cluster
from fedmq.wire import topics
from fedmq.errors import TransferError
from fedmq.wire.messages import ModelPointer
from fedmq.transport.base import Message
from fedmq.transport.flows import fetch_model, publish_model
from fedmq.transport.link import MqttLink
from fedmq.transport.settings import BrokerSettings

pytestmark = pytest.mark.timeout(240)

FED = "rmq"
PASSWORD = "rabbit-test-password"
#: Routing keys are MQTT topics with "/" turned into "."; {username} is expanded per user.
DEVICE_WRITE = rf"^fedmq\.{FED}\.(update\.{{username}}\..*|status\.{{username}})$"
DEVICE_READ = rf"^fedmq\.{FED}\.(model\..*|round|task\.{{username}}|receipt\.{{username}})$"
WAIT_S = 20.0


def _definitions() -> dict[str, object]:
    users = ["coordinator", "dev-a", "dev-b"]
    return {
        "users": [{"name": u, "password": PASSWORD, "tags": ["administrator"] if u == "coordinator" else []}
                  for u in users],
        "vhosts": [{"name": "/"}],
        "permissions": [{"user": u, "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"} for u in users],
        "topic_permissions": [{"user": u, "vhost": "/", "exchange": "amq.topic", "write": DEVICE_WRITE,
                               "read": DEVICE_READ} for u in users if u != "coordinator"],
        # MQTT sessions are classic queues on the node a client first connected to: mirrored
        # to every node, a session outlives its node.
        "policies": [{"vhost": "/", "name": "mqtt-sessions-mirrored", "pattern": "^mqtt-subscription-",
                      "apply-to": "queues", "priority": 0,
                      "definition": {"ha-mode": "all", "ha-sync-mode": "automatic"}}],
    }


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitCluster]:
    with start_rabbitmq_cluster(tmp_path_factory.mktemp("rabbitmq"), nodes=3, definitions=_definitions()) as c:
        yield c


def _link(cluster: RabbitCluster, node: int, user: str, tmp_path: Path, client_id: str | None = None) -> MqttLink:
    secret = tmp_path / f"{user}.password"
    secret.write_text(PASSWORD + "\n")
    settings = BrokerSettings(url=cluster.nodes[node].url, protocol="3.1.1", username=user,
                              password_file=str(secret), reconnect_min=0.2, reconnect_max=1.0)
    return MqttLink(settings, client_id=client_id or f"{user}-{node}").connect()


def _take(inbox: queue.SimpleQueue[Message], n: int, timeout: float = WAIT_S) -> list[Message]:
    got: list[Message] = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        try:
            got.append(inbox.get(timeout=max(0.01, deadline - time.monotonic())))
        except queue.Empty:
            break
    return got


def test_the_nodes_form_one_cluster(cluster: RabbitCluster) -> None:
    status = cluster.ctl(0, "cluster_status", "--formatter", "json")
    for node in cluster.nodes:
        assert node.name in status


def test_qos1_order_holds_from_a_device_node_to_the_coordinator_node(cluster: RabbitCluster, tmp_path: Path) -> None:
    coordinator = _link(cluster, 2, "coordinator", tmp_path)
    device = _link(cluster, 0, "dev-a", tmp_path)
    try:
        inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
        coordinator.subscribe(topics.update_filter(FED), inbox=inbox)
        base = topics.update_base(FED, "dev-a", "t1")
        for i in range(200):
            device.publish(f"{base}/c/{i}", i.to_bytes(4, "big"))
        got = _take(inbox, 200)
        assert [int.from_bytes(m.payload, "big") for m in got] == list(range(200))
    finally:
        device.close()
        coordinator.close()


def test_a_last_will_reaches_the_coordinator_on_another_node(cluster: RabbitCluster, tmp_path: Path) -> None:
    coordinator = _link(cluster, 2, "coordinator", tmp_path)
    inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
    coordinator.subscribe(topics.status_filter(FED), inbox=inbox)
    connected = queue.SimpleQueue[bool]()
    device = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="dev-b-will", protocol=paho.MQTTv311)
    device.username_pw_set("dev-b", PASSWORD)
    device.will_set(topics.status(FED, "dev-b"), b"offline", qos=1, retain=True)
    device.on_connect = lambda c, u, f, rc, p: connected.put(rc == 0)
    try:
        device.connect("127.0.0.1", cluster.nodes[1].mqtt_port)
        device.loop_start()
        assert connected.get(timeout=WAIT_S)
        device.loop_stop()
        sock = device.socket()
        assert sock is not None
        sock.close()  # the connection drops without a DISCONNECT: the broker publishes the will
        got = _take(inbox, 1)
        assert [(m.topic, m.payload) for m in got] == [(topics.status(FED, "dev-b"), b"offline")]
    finally:
        coordinator.close()


def test_topic_permissions_keep_a_device_to_its_own_update_topics(cluster: RabbitCluster, tmp_path: Path) -> None:
    coordinator = _link(cluster, 2, "coordinator", tmp_path)
    inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
    coordinator.subscribe(topics.update_filter(FED), inbox=inbox)
    intruder = _link(cluster, 0, "dev-a", tmp_path, client_id="dev-a-intruder")
    owner = _link(cluster, 1, "dev-b", tmp_path, client_id="dev-b-owner")
    try:
        forged = topics.update_base(FED, "dev-b", "forged") + "/m"
        intruder.publish(forged, b"forged")
        # Refused: RabbitMQ closes the connection that published where its user may not.
        deadline = time.monotonic() + WAIT_S
        while intruder.disconnects == 0:
            assert time.monotonic() < deadline, "the forged publish did not cost dev-a its connection"
            time.sleep(0.05)
        own = topics.update_base(FED, "dev-b", "own") + "/m"
        owner.publish_wait(own, b"own", timeout=WAIT_S)
        got = _take(inbox, 1)
        assert [(m.topic, m.payload) for m in got] == [(own, b"own")]
        assert inbox.empty()
    finally:
        owner.close()
        intruder.close()
        coordinator.close()


def test_a_retained_global_model_stays_on_the_node_that_took_it(cluster: RabbitCluster, tmp_path: Path) -> None:
    """The limit: fedmq's devices read the global model from retained messages, and RabbitMQ
    keeps those per node. The coordinator's node serves the model (through the exact-topic
    refetch of :func:`fetch_blob`; RabbitMQ 3.10 sends no retained message to a wildcard
    filter); a device on another node finds no model at all."""
    import hashlib

    coordinator = _link(cluster, 2, "coordinator", tmp_path)
    near = _link(cluster, 2, "dev-a", tmp_path, client_id="dev-a-near")
    far = _link(cluster, 0, "dev-b", tmp_path, client_id="dev-b-far")
    try:
        data = bytes(range(256)) * 4096  # 1 MiB: several chunks
        pointer = ModelPointer(1, "0123456789abcdef", 0, len(data), hashlib.sha256(data).hexdigest())
        publish_model(coordinator, FED, 1, data, pointer, chunk_size=256 * 1024, timeout=WAIT_S)
        got_pointer, blob = fetch_model(near, FED, timeout=WAIT_S)
        assert got_pointer.version == 1 and bytes(blob.data) == data
        with pytest.raises(TransferError, match="no retained model pointer"):
            fetch_model(far, FED, timeout=3.0)
    finally:
        far.close()
        near.close()
        coordinator.close()


def test_a_mirrored_session_outlives_the_node_it_lived_on(cluster: RabbitCluster) -> None:
    """Persistent sessions (clean_session false) hold across nodes, and under the mirroring
    policy survive the kill of their node: a device that reconnects to another node gets the
    task queued for it. Kills node 1: keep this test last."""
    received: queue.SimpleQueue[bytes] = queue.SimpleQueue()
    subscribed: queue.SimpleQueue[bool] = queue.SimpleQueue()

    def device(node: int) -> paho.Client:
        c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="dev-a-session", clean_session=False,
                        protocol=paho.MQTTv311)
        c.username_pw_set("dev-a", PASSWORD)
        c.on_message = lambda cl, u, m: received.put(m.payload)
        c.on_subscribe = lambda cl, u, mid, rcs, p: subscribed.put(True)
        c.connect("127.0.0.1", cluster.nodes[node].mqtt_port)
        c.loop_start()
        return c

    task = topics.task(FED, "dev-a")
    first = device(1)
    first.subscribe(task, qos=1)
    assert subscribed.get(timeout=WAIT_S)
    first.disconnect()
    first.loop_stop()
    publisher = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="coordinator-tasks", protocol=paho.MQTTv311)
    publisher.username_pw_set("coordinator", PASSWORD)
    publisher.connect("127.0.0.1", cluster.nodes[2].mqtt_port)
    publisher.loop_start()
    try:
        publisher.publish(task, b"task-1", qos=1).wait_for_publish(WAIT_S)
        # Wait until every mirror holds the message before the queue's node dies.
        deadline = time.monotonic() + WAIT_S
        while "1" not in cluster.ctl(0, "list_queues", "name", "messages", "--no-table-headers").split():
            assert time.monotonic() < deadline, "task never queued"
        cluster.kill(1)
        second = device(0)
        try:
            assert received.get(timeout=WAIT_S) == b"task-1"
        finally:
            second.disconnect()
            second.loop_stop()
    finally:
        publisher.disconnect()
        publisher.loop_stop()
