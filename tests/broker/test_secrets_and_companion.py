"""What ``fedmq broker init-ca / add-coordinator / add-device`` write: explicit modes on
secrets whatever the umask (issue 15, hole 5), certificates whose CN is the account, and
the device's companion account, with which the edge client's real ``fetch_latest_onnx``
downloads the ONNX export while the device's own connection stays up."""

from __future__ import annotations

import hashlib
import os
import stat
import tomllib
from pathlib import Path

import pytest
import tomli_w
from cryptography import x509
from typer.testing import CliRunner

from broker.cli import app
from edge_client.agent import fetch_latest_onnx
from edge_client.config import load_config
from fedmq.wire import topics
from fedmq.wire.messages import ModelPointer
from fedmq.transport import flows
from fedmq.transport.link import MqttLink
from fedmq.transport.settings import BrokerSettings

pytestmark = pytest.mark.security
FED = "f1"
runner = CliRunner()


def invoke(*args: str | Path):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def cn(cert: Path) -> str:
    return x509.load_pem_x509_certificate(cert.read_bytes()).subject.get_attributes_for_oid(
        x509.NameOID.COMMON_NAME)[0].value


@pytest.mark.parametrize("hasher", ["mosquitto_passwd", "fedmq"])
def test_secrets_get_explicit_modes_under_umask_000(tmp_path, monkeypatch, hasher):
    monkeypatch.chdir(tmp_path)
    old = os.umask(0)
    try:
        invoke("init-ca", "certs")
        invoke("add-coordinator", "coord", "--federation", FED, "--cert", "--hasher", hasher)
        invoke("add-device", "dev1", "--federation", FED, "--cert", "--hasher", hasher)
        invoke("add-device", "dev2", "--federation", FED, "--cert", "--hasher", hasher)  # rewrites passwd and acl
    finally:
        os.umask(old)
    expected = {
        "certs": 0o700, "auth": 0o750, "devices": 0o700, "devices/dev1": 0o700, "coordinators": 0o700,
        "coordinators/coord": 0o700,
        "certs/ca.key": 0o600, "certs/server.key": 0o600, "certs/ca.crt": 0o644, "certs/server.crt": 0o644,
        "auth/passwd": 0o600, "auth/acl": 0o644,
        "devices/dev1/password": 0o600, "devices/dev1/client.key": 0o600, "devices/dev1/predict-password": 0o600,
        "devices/dev1/predict-client.key": 0o600, "devices/dev1/username": 0o644, "devices/dev1/ca.crt": 0o644,
        "devices/dev1/client.crt": 0o644, "coordinators/coord/password": 0o600,
        "coordinators/coord/client.key": 0o600,
    }
    assert {name: oct(mode(tmp_path / name)) for name in expected} == {n: oct(m) for n, m in expected.items()}
    for path in tmp_path.rglob("*"):
        assert not mode(path) & 0o022, f"{path} is writable by group or others: {oct(mode(path))}"
        if path.is_file() and ("password" in path.name or path.suffix == ".key" or path.name == "passwd"):
            assert not mode(path) & 0o077, f"{path} is readable by others: {oct(mode(path))}"


def test_certificates_name_their_accounts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    invoke("init-ca", "certs")
    invoke("add-coordinator", "coord", "--cert", "--hasher", "fedmq")
    invoke("add-device", "pi-07", "--cert", "--hasher", "fedmq")
    assert cn(tmp_path / "coordinators/coord/client.crt") == "coord"
    assert cn(tmp_path / "devices/pi-07/client.crt") == "pi-07"
    assert cn(tmp_path / "devices/pi-07/predict-client.crt") == "pi-07.predict"
    assert (tmp_path / "devices/pi-07/predict-username").read_text() == "pi-07.predict\n"


def test_the_companion_suffix_is_reserved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for command in ("add-device", "add-coordinator"):
        result = runner.invoke(app, [command, "pi.predict", "--hasher", "fedmq"])
        assert result.exit_code == 1 and "ends in '.predict'" in result.stderr, result.output
    assert list(tmp_path.iterdir()) == []
    too_long = "d" * 60
    result = runner.invoke(app, ["add-device", too_long, "--hasher", "fedmq"])
    assert result.exit_code == 1 and "at most 56 characters" in result.stderr, result.output
    assert invoke("add-device", too_long, "--hasher", "fedmq", "--no-predict-account")


def _coordinator_link(dep, folder: Path) -> MqttLink:
    return MqttLink(BrokerSettings(url=f"mqtts://localhost:{dep.tls_port}", username="coord",
                                   password_file=str(folder / "password"), ca_file=str(folder / "ca.crt"),
                                   cert_file=str(folder / "client.crt"), key_file=str(folder / "client.key")),
                    client_id=f"fedmq-coordinator-{FED}")


def test_edge_predict_fetches_the_onnx_export_without_closing_the_agents_connection(shipped_mosquitto, peers,
                                                                                     tmp_path):
    folders = {"coord": tmp_path / "coord", "dev1": tmp_path / "dev1"}
    snippet: dict[str, str] = {}

    def setup(passwd, acl, ca_dir):
        invoke("init-ca", ca_dir)
        common = ["--passwd-file", passwd, "--acl-file", acl, "--ca-dir", ca_dir, "--federation", FED, "--cert"]
        invoke("add-coordinator", "coord", *common, "--out-dir", folders["coord"])
        snippet.update(tomllib.loads(invoke("add-device", "dev1", *common, "--out-dir", folders["dev1"]).stdout))
        return {}

    dep = shipped_mosquitto(setup, make_ca=False)
    onnx = os.urandom(300_000)  # bytes the edge client hands to onnxruntime; more than one chunk
    pointer = ModelPointer(version=3, spec_hash="s", round=2, size=len(onnx), sha256=hashlib.sha256(onnx).hexdigest(),
                           format="onnx")
    coordinator = _coordinator_link(dep, folders["coord"])
    with coordinator:
        flows.publish_model(coordinator, FED, 3, onnx, pointer, kind="onnx", timeout=30)

    # The running agent, with the device's own certificate.
    files = {key: str(folders["dev1"] / snippet["broker"][key]) for key in ("ca_file", "cert_file", "key_file")}
    agent = peers(dep.tls_port, "dev1", None, client_id="dev1",
                  tls={"ca_certs": files["ca_file"], "certfile": files["cert_file"], "keyfile": files["key_file"]})
    agent.connect_ok()
    agent.subscribe(topics.task(FED, "dev1"))
    task_sender = peers(dep.plain_port, "coord", (folders["coord"] / "password").read_text().strip())
    task_sender.connect_ok()

    config = folders["dev1"] / "edge.toml"
    config.write_text(tomli_w.dumps({**snippet, "broker": {**snippet["broker"], "url": f"mqtts://localhost:{dep.tls_port}"},
                                     "task": "digits-mlp", "data": "data.npz", "state_dir": "state"}))
    cfg = load_config(config, environ={})
    assert cfg.predict_tls_cert == folders["dev1"] / "predict-client.crt"
    assert fetch_latest_onnx(cfg, timeout=30) == onnx
    task_sender.publish(topics.task(FED, "dev1"), b"task-after-predict")
    agent.until(topics.task(FED, "dev1"), b"task-after-predict")
    assert agent.disconnects() == []

    # Control: without the companion account the same fetch closes the agent's connection.
    own = cfg.model_copy(update={"predict_username_file": None, "predict_password_file": None,
                                 "predict_tls_cert": None, "predict_tls_key": None})
    assert fetch_latest_onnx(own, timeout=30) == onnx
    kind, _ = agent.events.get(timeout=10)
    assert kind == "disconnect"
