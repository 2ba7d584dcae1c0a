"""Who a client is, on mosquitto run from the shipped configuration: the client id is
bound to the user name on every listener, a client certificate is bound to its account,
and a device's read-only companion account reads only the public topics (issue 15,
holes 1 and 4).

A takeover would close the victim's connection before the attacker's CONNACK; the
victim then proves it is still connected and still has its session by receiving a task
published after that CONNACK, with no disconnect seen in between (paho reports a
disconnect before a reconnect could deliver anything). Denied publishes are proven
absent with a sentinel sent after them by the same client (mosquitto keeps one
publisher's order to one subscriber).
"""

from __future__ import annotations

import pytest

from broker import credentials as cred
from fedmq.wire import topics

pytestmark = pytest.mark.security
FED = "f1"
COORDINATOR_CLIENT_ID = f"fedmq-coordinator-{FED}"  # the id coordinator/service.py connects with


@pytest.fixture(scope="module")
def fleet(identity_fleet):
    return identity_fleet


def _victim(dep, peers, name: str, *, tls: bool, client_id: str | None = None):
    account = dep.accounts[name]
    victim = peers(dep.peer(name, tls=account.tls() if tls else None, client_id=client_id))
    victim.connect_ok()
    return victim


def _still_served(coord, victim, topic: str, payload: bytes) -> None:
    """The victim receives ``payload`` on ``topic`` published now, and saw no disconnect."""
    coord.publish(topic, payload)
    victim.until(topic, payload)
    assert victim.disconnects() == [], "the victim's connection was closed"
    assert victim.client.is_connected()


@pytest.mark.parametrize("listener", ["plain", "tls"])
def test_a_device_cannot_take_over_another_devices_client_id(fleet, peers, listener):
    tls = listener == "tls"
    coord = peers(fleet.peer("coord"))
    coord.connect_ok()
    victim = _victim(fleet, peers, "dev-b", tls=tls, client_id="dev-b")
    victim.subscribe(topics.task(FED, "dev-b"))
    _still_served(coord, victim, topics.task(FED, "dev-b"), b"task-before")

    attacker = peers(fleet.peer("dev-a", tls=fleet.accounts["dev-a"].tls() if tls else None, client_id="dev-b"))
    attacker.connect_ok()  # accepted, but as client id "dev-a": its own
    _still_served(coord, victim, topics.task(FED, "dev-b"), b"task-after")
    # The attacker did not land in the victim's session: nothing of dev-b's comes to it.
    attacker.subscribe(topics.task(FED, "dev-a"))
    coord.publish(topics.task(FED, "dev-b"), b"task-for-b")
    coord.publish(topics.task(FED, "dev-a"), b"sentinel")
    assert [m.payload for m in attacker.until(topics.task(FED, "dev-a"), b"sentinel")] == [b"sentinel"]


@pytest.mark.parametrize("listener", ["plain", "tls"])
@pytest.mark.parametrize("stolen_id", [COORDINATOR_CLIENT_ID, "coord"])
def test_a_device_cannot_take_over_the_coordinators_client_id(fleet, peers, listener, stolen_id):
    tls = listener == "tls"
    coord = _victim(fleet, peers, "coord", tls=tls, client_id=COORDINATOR_CLIENT_ID)
    coord.subscribe(topics.status_filter(FED))
    device = peers(fleet.peer("dev-b"))
    device.connect_ok()
    attacker = peers(fleet.peer("dev-a", tls=fleet.accounts["dev-a"].tls() if tls else None, client_id=stolen_id))
    attacker.connect_ok()
    # The coordinator still receives what devices publish, over its first connection.
    device.publish(topics.status(FED, "dev-b"), b"online")
    coord.until(topics.status(FED, "dev-b"), b"online")
    assert coord.disconnects() == [] and coord.client.is_connected()


def test_the_same_account_twice_closes_the_first_connection(fleet, peers):
    # Control for the tests above: the binding is real, so a second connection of the
    # same identity does replace the first (this is why a device's predict command has
    # its own companion account).
    first = _victim(fleet, peers, "dev-b", tls=False)
    second = peers(fleet.peer("dev-b", client_id="anything-else"))
    second.connect_ok()
    kind, _ = first.events.get(timeout=10)
    assert kind == "disconnect"


def test_a_device_certificate_acts_only_as_its_own_device(fleet, peers):
    coord = peers(fleet.peer("coord"))
    coord.connect_ok()
    coord.subscribe(f"fedmq/{FED}/#")
    victim = _victim(fleet, peers, "dev-b", tls=False)
    victim.subscribe(topics.task(FED, "dev-b"))
    dev_a, dev_b = fleet.accounts["dev-a"], fleet.accounts["dev-b"]

    # dev-a's certificate with dev-b's user name and password: connected, as dev-a.
    impostor = peers(fleet.peer("dev-b", tls=dev_a.tls(), password=dev_b.password, client_id="dev-b"))
    impostor.connect_ok()
    impostor.publish(topics.status(FED, "dev-b"), b"forged")
    impostor.publish(topics.blob_manifest(topics.update_base(FED, "dev-b", "t1")), b"forged")
    impostor.publish(topics.status(FED, "dev-a"), b"sentinel")
    arrived = coord.until(topics.status(FED, "dev-a"), b"sentinel")
    assert [m.topic for m in arrived if m.payload == b"forged"] == []
    _still_served(coord, victim, topics.task(FED, "dev-b"), b"task-after-impostor")


def test_no_device_certificate_acts_as_the_coordinator(fleet, peers):
    coord_account, dev_a = fleet.accounts["coord"], fleet.accounts["dev-a"]
    listener = peers(fleet.peer("coord"))
    listener.connect_ok()
    listener.subscribe(f"fedmq/{FED}/#")
    dev_b = peers(fleet.peer("dev-b"))
    dev_b.connect_ok()

    impostor = peers(fleet.peer("coord", tls=dev_a.tls(), password=coord_account.password,
                                client_id=COORDINATOR_CLIENT_ID))
    impostor.connect_ok()
    impostor.subscribe(topics.task(FED, "dev-b"), topics.status_filter(FED))
    for topic in (topics.model_latest(FED), topics.round_announcement(FED), topics.task(FED, "dev-b"),
                  topics.receipt(FED, "dev-b")):
        impostor.publish(topic, b"forged")
    impostor.publish(topics.status(FED, "dev-a"), b"sentinel")
    assert [m.topic for m in listener.until(topics.status(FED, "dev-a"), b"sentinel") if m.payload == b"forged"] == []
    # Nor does it read what the coordinator reads: statuses and tasks of other devices.
    dev_b.publish(topics.status(FED, "dev-b"), b"b-online")
    listener.publish(topics.task(FED, "dev-b"), b"task-for-b")
    listener.until(topics.task(FED, "dev-b"), b"task-for-b")
    impostor.subscribe(topics.task(FED, "dev-a"))
    listener.publish(topics.task(FED, "dev-a"), b"own-task")
    got = [(m.topic, m.payload) for m in impostor.until(topics.task(FED, "dev-a"), b"own-task")]
    assert got == [(topics.task(FED, "dev-a"), b"own-task")]
    # The real coordinator certificate is the coordinator: it may publish the model (and,
    # being the same identity, replaces the listener's connection).
    dev_b.subscribe(topics.model_latest(FED))
    real = peers(fleet.peer("coord", tls=coord_account.tls()))
    real.connect_ok()
    real.publish(topics.model_latest(FED), b"pointer")
    dev_b.until(topics.model_latest(FED), b"pointer")


def test_on_tls_the_certificate_is_the_credential(fleet, peers):
    # use_identity_as_username: mosquitto does not check the password on the TLS
    # listener (documented in docs/broker.md); the plain listener still does.
    dev_a = fleet.accounts["dev-a"]
    peers(fleet.peer("dev-a", tls=dev_a.tls(), password="not-the-password")).connect_ok()
    kind, (reason, _) = peers(fleet.peer("dev-a", password="not-the-password")).connect()
    assert kind == "connect" and reason.is_failure


def test_the_companion_account_reads_only_the_public_topics(fleet, peers):
    coord = peers(fleet.peer("coord"))
    coord.connect_ok()
    coord.subscribe(f"fedmq/{FED}/#")
    device = _victim(fleet, peers, "dev-a", tls=True)
    device.subscribe(topics.task(FED, "dev-a"))
    reader_account = fleet.accounts["dev-a.predict"]
    reader = peers(fleet.peer("dev-a.predict", tls=reader_account.tls()))
    reader.connect_ok()
    # Connecting it left the device's connection alone.
    _still_served(coord, device, topics.task(FED, "dev-a"), b"task-1")

    reader.subscribe(topics.onnx_latest(FED), topics.model_latest(FED), topics.task(FED, "dev-a.predict"),
                     topics.receipt(FED, "dev-a.predict"), topics.transfer_requests(FED, "dev-a.predict"))
    for topic in (topics.task(FED, "dev-a.predict"), topics.receipt(FED, "dev-a.predict"),
                  topics.transfer_requests(FED, "dev-a.predict")):
        coord.publish(topic, b"secret")
    coord.publish(topics.model_latest(FED), b"model-pointer")
    coord.publish(topics.onnx_latest(FED), b"onnx-pointer")
    got = [(m.topic, m.payload) for m in reader.until(topics.onnx_latest(FED), b"onnx-pointer")]
    assert (topics.model_latest(FED), b"model-pointer") in got
    assert [p for _, p in got if p == b"secret"] == []

    # It writes nothing: not even the status and update topics a device has under its name.
    for topic in (topics.status(FED, "dev-a.predict"), topics.status(FED, "dev-a"),
                  topics.blob_manifest(topics.update_base(FED, "dev-a.predict", "t1")),
                  topics.blob_manifest(topics.update_base(FED, "dev-a", "t1"))):
        reader.publish(topic, b"forged")
    device.publish(topics.status(FED, "dev-a"), b"sentinel")
    assert [m.topic for m in coord.until(topics.status(FED, "dev-a"), b"sentinel") if m.payload == b"forged"] == []


def test_password_only_tls_checks_the_password_and_still_binds_client_ids(shipped_mosquitto, peers, tmp_path):
    # The documented switch for fleets without client certificates (fedmq broker render
    # / run --mosquitto --tls-auth password): TLS authenticates the broker, the password
    # the client, and the client id is still the user name.
    passwords = {name: cred.generate_password() for name in ("coord", "dev-a", "dev-b")}

    def setup(passwd, acl, ca_dir):
        for name, password in passwords.items():
            cred.set_password(passwd, name, password, hasher="fedmq")
        cred.write_acl(acl, {"coord": [FED]})
        return {}

    dep = shipped_mosquitto(setup, tls_auth="password")
    ca = {"ca_certs": str(dep.ca_dir / "ca.crt")}
    coord = peers(dep.tls_port, "coord", passwords["coord"], tls=ca)
    coord.connect_ok()
    victim = peers(dep.tls_port, "dev-b", passwords["dev-b"], tls=ca, client_id="dev-b")
    victim.connect_ok()
    victim.subscribe(topics.task(FED, "dev-b"))

    kind, (reason, _) = peers(dep.tls_port, "dev-a", "wrong", tls=ca).connect()
    assert kind == "connect" and reason.is_failure
    peers(dep.tls_port, "dev-a", passwords["dev-a"], tls=ca, client_id="dev-b").connect_ok()
    _still_served(coord, victim, topics.task(FED, "dev-b"), b"task-after")
