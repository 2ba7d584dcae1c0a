"""Broker settings, the launchers and MqttLink against real brokers: packet-size limit,
last will, password files, TLS with client certificates."""

from __future__ import annotations

import datetime
import ipaddress
import queue
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from broker.launch import BrokerLaunchError, free_port, start_mosquitto
from fedmq.wire import topics
from fedmq.errors import BrokerConnectError, ConfigError, TransportError
from fedmq.wire.messages import Status
from fedmq.transport import BrokerSettings, MqttLink, parse_broker_url, publish_packet_size

WAIT = 30.0


@pytest.mark.parametrize(("url", "expected"), [
    ("mqtt://broker.lan:1884", ("broker.lan", 1884, False)),
    ("mqtt://broker.lan", ("broker.lan", 1883, False)),
    ("mqtts://broker.lan", ("broker.lan", 8883, True)),
    ("ssl://10.0.0.2:9999", ("10.0.0.2", 9999, True)),
    ("broker.lan", ("broker.lan", 1883, False)),
    ("127.0.0.1:2000", ("127.0.0.1", 2000, False)),
    ("mqtt://[::1]:1999", ("::1", 1999, False)),
])
def test_parse_broker_url(url, expected):
    assert parse_broker_url(url) == expected


@pytest.mark.parametrize(("url", "fragment"), [
    ("", "empty"), ("http://x", "scheme"), ("mqtt://u:p@x", "credentials"), ("mqtt://x:99999", "port"),
    ("mqtt://x/path", "path"), ("mqtt://:1883", "no host"),
])
def test_bad_broker_urls_are_named(url, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_broker_url(url)


def test_settings_validation_names_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="protocol"):
        BrokerSettings(protocol="4")
    with pytest.raises(ConfigError, match="use mqtts"):
        BrokerSettings(url="mqtt://x", ca_file=str(tmp_path))
    with pytest.raises(ConfigError, match=str(tmp_path / "nope")):
        BrokerSettings(url="mqtts://x", ca_file=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="both"):
        BrokerSettings(url="mqtts://x", cert_file=str(tmp_path))
    with pytest.raises(ConfigError, match=r"broker: unknown option\(s\) \['pasword_file'\]"):
        BrokerSettings.from_mapping({"pasword_file": "x"})
    with pytest.raises(ConfigError, match="keepalive: expected a number"):
        BrokerSettings.from_mapping({"keepalive": "30"})
    empty = tmp_path / "empty"
    empty.write_text("")
    with pytest.raises(ConfigError, match=f"{empty} is empty"):
        BrokerSettings(username="dev1", password_file=str(empty)).credentials()
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    with pytest.raises(ConfigError, match="no username"):
        BrokerSettings(password_file=str(secret)).credentials()
    settings = BrokerSettings.from_mapping({"url": "mqtt://h:1", "protocol": 5, "username": "dev1",
                                            "password_file": str(secret), "session_expiry": 60})
    assert settings.credentials() == ("dev1", "s3cret") and settings.persistent
    assert not settings.with_(protocol="3.1.1").persistent


def test_missing_mosquitto_binary_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMQ_MOSQUITTO", str(tmp_path / "no-such-mosquitto"))
    with pytest.raises(BrokerLaunchError, match="no-such-mosquitto"):
        start_mosquitto(tmp_path)


def test_bad_mosquitto_config_reports_its_log(tmp_path):
    with pytest.raises(BrokerLaunchError, match="exited"):
        start_mosquitto(tmp_path, extra_conf="no_such_option 1")


def test_packet_size_formula_matches_what_mosquitto_accepts(mosquitto_factory):
    broker = mosquitto_factory(extra_conf="max_packet_size 4096")
    link = MqttLink(BrokerSettings(url=broker.url), "sizer").connect()
    sub = MqttLink(BrokerSettings(url=broker.url), "watcher").connect()
    sub.subscribe("size/#")
    assert link.broker_max_packet == 4096
    topic = "size/exact"
    largest = link.max_payload(topic)
    assert publish_packet_size(topic, largest) == 4096
    with pytest.raises(TransportError, match="exceeds the broker's maximum packet size 4096"):
        link.publish(topic, b"x" * (largest + 1))
    link.publish_wait(topic, b"y" * largest, timeout=WAIT)
    assert sub.inbox.get(timeout=WAIT).payload == b"y" * largest
    assert link.connected and link.disconnects == 0
    link.close()
    sub.close()


_WILL_CHILD = """
import sys
from fedmq.transport import BrokerSettings, MqttLink, Will
from fedmq.wire.messages import Status
from fedmq.wire import topics
url, protocol = sys.argv[1], sys.argv[2]
will = Will(topics.status("f", "dev7"), Status(device="dev7", online=False).to_bytes())
link = MqttLink(BrokerSettings(url=url, protocol=protocol, keepalive=5), "dev7", will=will).connect()
link.publish_wait(topics.status("f", "dev7"), Status(device="dev7", online=True).to_bytes(), retain=True)
print("ready", flush=True)
sys.stdin.read()
"""


def test_last_will_marks_a_crashed_device_offline(broker):
    observer = MqttLink(BrokerSettings(url=broker.url, protocol=broker.protocol), "observer").connect()
    observer.subscribe(topics.status("f", "dev7"))
    child = subprocess.Popen([sys.executable, "-c", _WILL_CHILD, broker.url, broker.protocol],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline().strip() == b"ready"
        assert Status.from_bytes(observer.inbox.get(timeout=WAIT).payload).online
        child.kill()
        child.wait(WAIT)
        will = Status.from_bytes(observer.inbox.get(timeout=WAIT).payload)
        assert will.device == "dev7" and not will.online
    finally:
        child.kill()
        child.wait(WAIT)
        observer.close()


def test_password_file_login_and_refusal(mosquitto_factory, tmp_path):
    passwd = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), "dev1", "right-password"], check=True)
    broker = mosquitto_factory(conf_text=f"allow_anonymous false\npassword_file {passwd}")
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.write_text("right-password\n")
    bad.write_text("wrong-password\n")
    link = MqttLink(BrokerSettings(url=broker.url, username="dev1", password_file=str(good)), "dev1").connect()
    link.publish_wait("fedmq/f/status/dev1", b"hello", timeout=WAIT)
    link.close()
    refused = MqttLink(BrokerSettings(url=broker.url, username="dev1", password_file=str(bad)), "dev1b")
    with pytest.raises(BrokerConnectError, match="refused") as wrong:
        refused.connect(timeout=WAIT)
    assert wrong.value.cause == "not_authorised" and wrong.value.url == broker.url
    assert "username 'dev1'" in str(wrong.value) and broker.url in str(wrong.value)
    assert "code 134" in str(wrong.value) or "code 135" in str(wrong.value)
    anonymous = MqttLink(BrokerSettings(url=broker.url), "anon")
    with pytest.raises(BrokerConnectError, match="refused") as anon:
        anonymous.connect(timeout=WAIT)
    assert anon.value.cause == "not_authorised" and "username (none set)" in str(anon.value)


def _cert(subject: str, key, issuer_name, issuer_key, *, ca: bool, san: x509.SubjectAlternativeName | None = None):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(issuer_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write_pem(folder: Path, name: str, cert, key) -> tuple[str, str]:
    crt, pem = folder / f"{name}.crt", folder / f"{name}.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    return str(crt), str(pem)


def test_tls_with_client_certificate(mosquitto_factory, tmp_path):
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedmq test CA")])
    ca = _cert("fedmq test CA", ca_key, ca_name, ca_key, ca=True)
    ca_file, _ = _write_pem(tmp_path, "ca", ca, ca_key)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _cert("127.0.0.1", server_key, ca_name, ca_key, ca=False,
                   san=x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]))
    server_crt, server_pem = _write_pem(tmp_path, "server", server, server_key)
    client_key = ec.generate_private_key(ec.SECP256R1())
    client_crt, client_pem = _write_pem(tmp_path, "dev1", _cert("dev1", client_key, ca_name, ca_key, ca=False),
                                        client_key)
    broker = mosquitto_factory(conf_text=(f"cafile {ca_file}\ncertfile {server_crt}\nkeyfile {server_pem}\n"
                                          "require_certificate true\nuse_identity_as_username true\n"
                                          "allow_anonymous false"))
    url = f"mqtts://127.0.0.1:{broker.port}"
    link = MqttLink(BrokerSettings(url=url, ca_file=ca_file, cert_file=client_crt, key_file=client_pem),
                    "dev1").connect()
    inbox: queue.SimpleQueue = queue.SimpleQueue()
    link.subscribe("fedmq/f/task/dev1", inbox=inbox)
    link.publish_wait("fedmq/f/task/dev1", b"over tls", timeout=WAIT)
    assert inbox.get(timeout=WAIT).payload == b"over tls"
    link.close()
    no_client_cert = MqttLink(BrokerSettings(url=url, ca_file=ca_file, connect_timeout=1.5), "dev2")
    with pytest.raises(BrokerConnectError) as info:
        no_client_cert.connect()
    no_client_cert.close()
    # TLS 1.3: the broker rejects the missing certificate after our side of the handshake
    # succeeded, so the client sees only a connection that never answers CONNECT.
    assert info.value.cause == "timeout" and "cert_file" in str(info.value), str(info.value)


def test_refused_port_is_reported_at_once_naming_url_and_cause():
    url = f"mqtt://127.0.0.1:{free_port()}"
    link = MqttLink(BrokerSettings(url=url, connect_timeout=WAIT), "dev1")
    start = time.monotonic()
    with pytest.raises(BrokerConnectError) as info:
        link.connect()
    # The cause is known from the socket: reporting it must not wait for the timeout.
    assert time.monotonic() - start < 2.0
    assert info.value.cause == "refused" and url in str(info.value) and "connection refused" in str(info.value)
    assert not link._started  # noqa: SLF001 - nothing keeps retrying behind the caller's back


def test_unresolvable_host_names_the_host():
    link = MqttLink(BrokerSettings(url="mqtt://no-such-broker.invalid:1883", connect_timeout=WAIT), "dev1")
    with pytest.raises(BrokerConnectError) as info:
        link.connect()
    assert info.value.cause == "unresolvable"
    assert "'no-such-broker.invalid' cannot be resolved" in str(info.value)
    assert "mqtt://no-such-broker.invalid:1883" in str(info.value)


def test_tls_with_the_wrong_ca_says_certificate_verify_failed(mosquitto_factory, tmp_path):
    ca_file, server_crt, server_pem = _ca_and_server(tmp_path / "right")
    wrong_ca, _, _ = _ca_and_server(tmp_path / "wrong")
    broker = mosquitto_factory(conf_text=f"cafile {ca_file}\ncertfile {server_crt}\nkeyfile {server_pem}\n"
                                         "allow_anonymous true")
    url = f"mqtts://127.0.0.1:{broker.port}"
    link = MqttLink(BrokerSettings(url=url, ca_file=wrong_ca, connect_timeout=WAIT), "dev1")
    start = time.monotonic()
    with pytest.raises(BrokerConnectError) as info:
        link.connect()
    assert time.monotonic() - start < WAIT / 2
    assert info.value.cause == "tls" and url in str(info.value)
    assert "certificate verify failed" in str(info.value)
    MqttLink(BrokerSettings(url=url, ca_file=ca_file), "dev1").connect().close()


def test_tls_client_to_a_plain_listener_is_a_tls_error(mosquitto):
    url = f"mqtts://127.0.0.1:{mosquitto.port}"
    with pytest.raises(BrokerConnectError) as info:
        MqttLink(BrokerSettings(url=url, connect_timeout=5.0), "dev1").connect()
    assert info.value.cause == "tls" and "TLS handshake failed" in str(info.value), str(info.value)


def _ca_and_server(folder: Path) -> tuple[str, str, str]:
    folder.mkdir()
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"fedmq test CA {folder.name}")])
    ca_file, _ = _write_pem(folder, "ca", _cert(f"fedmq test CA {folder.name}", ca_key, ca_name, ca_key, ca=True),
                            ca_key)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _cert("127.0.0.1", server_key, ca_name, ca_key, ca=False,
                   san=x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]))
    return (ca_file, *_write_pem(folder, "server", server, server_key))


def test_a_publish_queued_while_the_broker_is_down_is_acknowledged_after_it_returns(mosquitto):
    # paho's own handle of a message published while disconnected raises "not currently
    # connected" forever, even after paho sent it on the reconnect; the link's wait must
    # see its PUBACK instead (a device publishing its update during a broker restart).
    observer = MqttLink(BrokerSettings(url=mosquitto.url, protocol="5", session_expiry=300), "obs").connect()
    observer.subscribe("t/queued")
    link = MqttLink(BrokerSettings(url=mosquitto.url, protocol="5", session_expiry=300), "pub").connect()
    try:
        mosquitto.stop()  # saves the observer's session, so the message is queued for it
        end = time.monotonic() + WAIT
        while link.connected and time.monotonic() < end:
            time.sleep(0.01)  # paho notices the closed socket on its own thread
        assert not link.connected
        handle = link.publish("t/queued", b"while down")
        mosquitto.start()
        handle.wait(WAIT * 3)
        assert handle.done()
        assert observer.inbox.get(timeout=WAIT * 3).payload == b"while down"
    finally:
        link.close()
        observer.close()


def test_flush_before_close_delivers_everything_queued(mosquitto):
    # close() drops what paho still holds; flush() first waits for every PUBACK, so a process
    # that publishes its last receipts and then exits loses none of them (the coordinator's
    # run ends this way).
    observer = MqttLink(BrokerSettings(url=mosquitto.url, protocol="5"), "obs").connect()
    observer.subscribe("t/flush")
    link = MqttLink(BrokerSettings(url=mosquitto.url, protocol="5"), "pub").connect()
    count, payload = 200, b"\x01" * 50_000
    try:
        for i in range(count):
            link.publish("t/flush", i.to_bytes(4, "big") + payload)
        assert link.flush(WAIT)
    finally:
        link.close()
    got = sorted(int.from_bytes(observer.inbox.get(timeout=WAIT).payload[:4], "big") for _ in range(count))
    observer.close()
    assert got == list(range(count))


def test_flush_returns_at_once_while_the_broker_is_down(mosquitto):
    link = MqttLink(BrokerSettings(url=mosquitto.url, protocol="5", session_expiry=300), "pub").connect()
    try:
        mosquitto.stop()
        end = time.monotonic() + WAIT
        while link.connected and time.monotonic() < end:
            time.sleep(0.01)
        assert not link.connected
        link.publish("t/down", b"queued")
        started = time.monotonic()
        assert link.flush(WAIT) is False
        assert time.monotonic() - started < WAIT / 2
    finally:
        link.close()
