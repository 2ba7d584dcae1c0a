"""mosquitto run from the shipped broker/mosquitto.conf and broker/acl: authentication,
least-privilege ACL by user name, mutual TLS, packet limit, persistence.

Denied messages are proven absent without sleeping: the same publisher then sends an
allowed sentinel, and mosquitto delivers one publisher's messages to one subscriber in
order, so anything that got through would arrive before the sentinel.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from broker import credentials as cred
from fedmq.wire import topics

FED = "f1"


def test_anonymous_and_wrong_passwords_are_refused(deployment, peers):
    kind, (reason, _) = peers(deployment.peer(None)).connect()
    assert kind == "connect" and reason.is_failure and reason.getName() == "Not authorized"

    kind, (reason, _) = peers(deployment.peer("dev-a", password="not-the-password")).connect()
    assert kind == "connect" and reason.is_failure

    kind, (reason, _) = peers(deployment.peer("nobody", password="x")).connect()
    assert kind == "connect" and reason.is_failure


def test_both_hash_formats_are_accepted(deployment, peers):
    # dev-a / coord2 were hashed by mosquitto_passwd, dev-b / coord by fedmq's own PBKDF2.
    for name in ("dev-a", "dev-b", "coord", "coord2"):
        peers(deployment.peer(name)).connect_ok()


def test_connack_announces_the_shipped_packet_and_inflight_limits(deployment, peers):
    props = peers(deployment.peer("dev-a")).connect_ok()
    assert props.MaximumPacketSize == 1048576
    assert props.ReceiveMaximum == 100


def test_device_writes_only_its_own_status_and_updates(deployment, peers):
    coord = peers(deployment.peer("coord"))
    coord.connect_ok()
    coord.subscribe(f"fedmq/{FED}/#")
    dev_a = peers(deployment.peer("dev-a"))
    dev_a.connect_ok()

    allowed = [(topics.status(FED, "dev-a"), b"a-online"),
               (topics.blob_manifest(topics.update_base(FED, "dev-a", "t1")), b"manifest"),
               (topics.blob_chunk(topics.update_base(FED, "dev-a", "t1"), 0), b"chunk0")]
    for topic, payload in allowed:
        dev_a.publish(topic, payload)
    got = [(m.topic, m.payload) for m in coord.until(*allowed[-1])]
    assert all(item in got for item in allowed)

    denied = [topics.status(FED, "dev-b"),
              topics.blob_manifest(topics.update_base(FED, "dev-b", "t1")),
              topics.blob_chunk(topics.update_base(FED, "dev-b", "t1"), 0),
              f"fedmq/{FED}/update/dev-a-evil/t1/m",  # %u is a whole level, not a prefix
              topics.model_latest(FED),
              topics.blob_chunk(topics.model_blob(FED, 7), 0),
              topics.onnx_latest(FED),
              topics.round_announcement(FED),
              topics.task(FED, "dev-a"),
              topics.task(FED, "dev-b"),
              topics.receipt(FED, "dev-a"),
              topics.transfer_requests(FED, "dev-b"),
              f"fedmq/{FED}/something-else",
              "elsewhere/topic"]
    for topic in denied:
        dev_a.publish(topic, b"forged")
    sentinel = (topics.status(FED, "dev-a"), b"sentinel")
    dev_a.publish(*sentinel)
    arrived = coord.until(*sentinel)
    assert [m.topic for m in arrived if m.payload == b"forged"] == []


def test_device_reads_only_its_own_tasks_receipts_and_the_public_topics(deployment, peers):
    coord = peers(deployment.peer("coord"))
    coord.connect_ok()
    dev_b = peers(deployment.peer("dev-b"))
    dev_b.connect_ok()
    dev_b.publish(topics.status(FED, "dev-b"), b"b-status", retain=True)

    dev_a = peers(deployment.peer("dev-a"))
    dev_a.connect_ok()
    dev_a.subscribe(topics.task(FED, "dev-a"), topics.task(FED, "dev-b"), topics.receipt(FED, "dev-b"),
                    topics.transfer_requests(FED, "dev-b"), f"fedmq/{FED}/task/+", topics.status_filter(FED),
                    topics.update_filter(FED), f"fedmq/{FED}/model/#", topics.round_announcement(FED))

    public = [(topics.model_latest(FED), b"model-pointer"), (topics.round_announcement(FED), b"round-3")]
    secret = [(topics.task(FED, "dev-b"), b"task-for-b"), (topics.receipt(FED, "dev-b"), b"receipt-for-b"),
              (topics.transfer_requests(FED, "dev-b"), b"xfer-for-b")]
    for topic, payload in public + secret:
        coord.publish(topic, payload)
    dev_b.publish(topics.blob_manifest(topics.update_base(FED, "dev-b", "t9")), b"b-update")
    sentinel = (topics.task(FED, "dev-a"), b"task-for-a")
    coord.publish(*sentinel)

    got = [(m.topic, m.payload) for m in dev_a.until(*sentinel)]
    for item in public:
        assert item in got
    for item in secret:
        assert item not in got
    assert (topics.status(FED, "dev-b"), b"b-status") not in got
    assert all("/update/" not in topic for topic, _ in got)


def test_coordinator_is_confined_to_its_federation(deployment, peers):
    coord2 = peers(deployment.peer("coord2"))  # coordinator of f2
    coord2.connect_ok()
    coord2.subscribe("fedmq/f2/#")
    coord = peers(deployment.peer("coord"))  # coordinator of f1
    coord.connect_ok()
    coord.publish(topics.round_announcement("f2"), b"forged-round")
    coord.publish(topics.model_latest("f2"), b"forged-model")
    # Its only right in f2 is the device pattern on its own user name: a sentinel.
    sentinel = (topics.status("f2", "coord"), b"sentinel")
    coord.publish(*sentinel)
    assert [m.payload for m in coord2.until(*sentinel) if m.payload.startswith(b"forged")] == []


def test_mutual_tls_with_the_generated_ca(deployment, peers):
    dev_a = deployment.accounts["dev-a"]
    props = peers(deployment.peer("dev-a", tls=dev_a.tls())).connect_ok()
    assert props.MaximumPacketSize == 1048576

    # No client certificate: the handshake is refused (require_certificate true).
    kind, value = _connect_tls(peers(deployment.peer("dev-a", tls=dev_a.tls(cert=False))))
    assert kind != "connect", value


def test_tls_refuses_certificates_of_another_ca(deployment, peers, tmp_path: Path):
    other = cred.init_ca(tmp_path / "other-ca")
    cred.issue_client_cert(other.folder, "dev-a", tmp_path / "c.crt", tmp_path / "c.key")
    dev_a = deployment.accounts["dev-a"]

    # A client certificate from another CA, with the right password: refused by the broker.
    tls = {"ca_certs": dev_a.tls()["ca_certs"], "certfile": str(tmp_path / "c.crt"),
           "keyfile": str(tmp_path / "c.key")}
    kind, value = _connect_tls(peers(deployment.peer("dev-a", tls=tls)))
    assert kind != "connect", value

    # A client that trusts another CA refuses the broker's server certificate.
    peer = peers(deployment.peer("dev-a", tls={**dev_a.tls(), "ca_certs": str(other.ca_cert)}))
    with pytest.raises(ssl.SSLCertVerificationError):
        peer.connect()


def test_retained_model_survives_a_restart(deployment, peers):
    coord = peers(deployment.peer("coord"))
    coord.connect_ok()
    pointer = (topics.model_latest(FED), b"version-42")
    coord.publish(*pointer, retain=True)
    coord.close()
    deployment.broker.restart()  # SIGTERM: mosquitto saves to the rendered data folder
    assert (deployment.dirs.data / "mosquitto.db").is_file()

    dev_b = peers(deployment.peer("dev-b"))
    dev_b.connect_ok()
    dev_b.subscribe(topics.model_latest(FED))
    msg = dev_b.until(*pointer)[-1]
    assert msg.retain


def _connect_tls(peer):
    """Connect where the handshake may fail in connect() (TLS 1.2) or right after it (TLS 1.3
    sends the server's verdict on the client certificate after the client has finished)."""
    try:
        return peer.connect()
    except (ssl.SSLError, ConnectionError) as exc:
        return "error", exc


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_tls_version_is_a_minimum(deployment, peers, version):
    # tls_version tlsv1.2 in mosquitto 2.0: 1.2 and 1.3 clients both get in.
    files = deployment.accounts["dev-a"].tls()
    ctx = ssl.create_default_context(cafile=files["ca_certs"])
    ctx.load_cert_chain(files["certfile"], files["keyfile"])
    ctx.minimum_version = ctx.maximum_version = version
    peer = peers(deployment.tls_port, "dev-a", deployment.accounts["dev-a"].password)
    peer.client.tls_set_context(ctx)
    peer.connect_ok()
    expected = {ssl.TLSVersion.TLSv1_2: "TLSv1.2", ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]
    assert peer.client.socket().version() == expected
