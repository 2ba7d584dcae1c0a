"""``fedmq broker`` commands through typer's CliRunner: what they write works with the
shipped mosquitto configuration, and bad input gives a clear error and writes nothing."""

from __future__ import annotations

import re
import stat
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from broker import credentials as cred
from broker.cli import app
from fedmq.wire import topics

runner = CliRunner()


def invoke(*args: str | Path):
    return runner.invoke(app, [str(a) for a in args])


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("hasher", ["mosquitto_passwd", "fedmq"])
def test_cli_accounts_work_with_the_shipped_mosquitto(shipped_mosquitto, peers, tmp_path, hasher):
    snippets, outputs = {}, {}
    folders = {"dev1": tmp_path / "dev1", "coord": tmp_path / "coord"}

    def setup(passwd: Path, acl: Path, ca_dir: Path) -> dict:
        result = invoke("init-ca", ca_dir, "--hostname", "localhost", "--hostname", "127.0.0.1")
        assert result.exit_code == 0, result.output
        common = ["--passwd-file", passwd, "--acl-file", acl, "--ca-dir", ca_dir, "--federation", "f1",
                  "--cert", "--hasher", hasher]
        for command, name in (("add-coordinator", "coord"), ("add-device", "dev1")):
            result = invoke(command, name, *common, "--out-dir", folders[name])
            assert result.exit_code == 0, result.output
            snippets[name] = tomllib.loads(result.stdout)
            outputs[name] = result.stderr
        return {}

    dep = shipped_mosquitto(setup, make_ca=False)
    assert all(f"({hasher})" in err for err in outputs.values())
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+:\$7\$101\$[A-Za-z0-9+/]{16}\$[A-Za-z0-9+/]{86}==", line)
               for line in dep.dirs.passwd.read_text().splitlines())
    assert cred.coordinator_accounts(dep.dirs.acl) == {"coord": ["f1"]}

    dev = snippets["dev1"]
    assert dev["broker"]["url"] == "mqtts://localhost:8883" and dev["device_id"] == "dev1" \
        and dev["federation"] == "f1"
    dev_files = {key: folders["dev1"] / dev["broker"][key]
                 for key in ("username_file", "password_file", "ca_file", "cert_file", "key_file")}
    assert mode(dev_files["password_file"]) == 0o600 and mode(dev_files["key_file"]) == 0o600
    user = dev_files["username_file"].read_text().strip()
    password = dev_files["password_file"].read_text().strip()
    device = peers(dep.tls_port, user, password, tls={"ca_certs": str(dev_files["ca_file"]),
                                                      "certfile": str(dev_files["cert_file"]),
                                                      "keyfile": str(dev_files["key_file"])})
    device.connect_ok()

    co = snippets["coord"]["broker"]
    assert snippets["coord"]["federation"] == "f1" and co["username"] == "coord"
    coordinator = peers(dep.tls_port, co["username"], Path(co["password_file"]).read_text().strip(),
                        tls={"ca_certs": co["ca_file"], "certfile": co["cert_file"], "keyfile": co["key_file"]})
    coordinator.connect_ok()
    coordinator.subscribe(topics.status_filter("f1"))
    device.publish(topics.status("f1", "dev1"), b"online")
    assert coordinator.until(topics.status("f1", "dev1"), b"online")
    device.subscribe(topics.task("f1", "dev1"))
    coordinator.publish(topics.task("f1", "dev1"), b"task-2")
    assert device.until(topics.task("f1", "dev1"), b"task-2")


def test_add_device_without_cert_prints_a_plain_snippet_and_a_note(tmp_path):
    result = invoke("add-device", "dev2", "--passwd-file", tmp_path / "auth/passwd", "--acl-file",
                    tmp_path / "auth/acl", "--ca-dir", tmp_path / "no-ca", "--out-dir", tmp_path / "dev2",
                    "--broker-url", "mqtt://127.0.0.1:1883", "--hasher", "fedmq")
    assert result.exit_code == 0, result.output
    snippet = tomllib.loads(result.stdout)
    assert snippet["broker"]["url"] == "mqtt://127.0.0.1:1883"
    assert not any(key in snippet["broker"] for key in ("ca_file", "cert_file", "key_file"))
    password = (tmp_path / "dev2" / snippet["broker"]["password_file"]).read_text().strip()
    users = cred.read_password_file(tmp_path / "auth/passwd")
    assert cred.verify_password(password, users["dev2"]) and not cred.verify_password(password + "x", users["dev2"])
    # The ACL is the shipped one, ready for the broker.
    assert (tmp_path / "auth/acl").read_text().startswith(cred.SHIPPED_ACL.read_text())

    result = invoke("add-device", "dev3", "--passwd-file", tmp_path / "auth/passwd", "--acl-file",
                    tmp_path / "auth/acl", "--ca-dir", tmp_path / "no-ca", "--out-dir", tmp_path / "dev3")
    assert result.exit_code == 0, result.output
    assert "require_certificate" in result.stderr and "system CAs" in result.stderr


def test_replace_issues_a_new_password_and_coordinators_gain_federations(tmp_path):
    paths = ["--passwd-file", tmp_path / "passwd", "--acl-file", tmp_path / "acl", "--hasher", "fedmq"]
    assert invoke("add-coordinator", "coord", "--federation", "f1", *paths, "--out-dir", tmp_path / "c").exit_code == 0
    first = cred.read_password_file(tmp_path / "passwd")["coord"]
    again = invoke("add-coordinator", "coord", "--federation", "f2", *paths, "--out-dir", tmp_path / "c")
    assert again.exit_code == 1 and "--replace" in again.stderr
    again = invoke("add-coordinator", "coord", "--federation", "f2", *paths, "--out-dir", tmp_path / "c", "--replace")
    assert again.exit_code == 0, again.output
    assert cred.read_password_file(tmp_path / "passwd")["coord"] != first
    assert cred.coordinator_accounts(tmp_path / "acl") == {"coord": ["f1", "f2"]}
    assert cred.verify_password((tmp_path / "c/password").read_text().strip(),
                                cred.read_password_file(tmp_path / "passwd")["coord"])


@pytest.mark.parametrize("args, expected", [
    (["add-device", "dev/1"], "device name 'dev/1' is invalid"),
    (["add-device", "dev1", "--federation", "a+b"], "federation 'a+b' is invalid"),
    (["add-device", "dev1", "--cert", "--ca-dir", "{tmp}/missing-ca"], "{tmp}/missing-ca/ca.crt: not found"),
    (["add-device", "dev1", "--broker-url", "http://x"], "--broker-url 'http://x' is invalid"),
    (["add-device", "dev1", "--hasher", "md5"], "--hasher 'md5' is unknown"),
    (["add-device", "dev1", "--passwd-file", "{tmp}/a-file/passwd"], "{tmp}/a-file/passwd"),
    (["add-device", "dev1", "--passwd-file", "{tmp}/bad-passwd"], "{tmp}/bad-passwd:1: expected 'username:hash'"),
    (["add-device", "dev1", "--acl-file", "{tmp}/bad-acl"], "{tmp}/bad-acl:2: unexpected rule"),
    (["init-ca", "{tmp}/ca", "--hostname", "bad host!"], "hostname 'bad host!' is invalid"),
    (["run", "--host", "0.0.0.0"], "not a loopback address"),
])
def test_bad_input_gives_a_clear_error_and_writes_nothing(tmp_path, monkeypatch, args, expected):
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "bad-passwd").write_text("no colon here\n")
    (tmp_path / "bad-acl").write_text("user someone\ntopic read #\n")
    monkeypatch.chdir(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    result = invoke(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert result.exit_code == 1, result.output
    assert expected.replace("{tmp}", str(tmp_path)) in result.stderr
    assert "Traceback" not in result.output
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_names_are_either_devices_or_coordinators(tmp_path):
    paths = ["--passwd-file", tmp_path / "passwd", "--acl-file", tmp_path / "acl", "--hasher", "fedmq"]
    assert invoke("add-device", "dev1", *paths, "--out-dir", tmp_path / "d").exit_code == 0
    assert invoke("add-coordinator", "coord", *paths, "--out-dir", tmp_path / "c").exit_code == 0
    result = invoke("add-coordinator", "dev1", *paths, "--out-dir", tmp_path / "x", "--replace")
    assert result.exit_code == 1 and "'dev1' is a device" in result.stderr
    result = invoke("add-device", "coord", *paths, "--out-dir", tmp_path / "x", "--replace")
    assert result.exit_code == 1 and "'coord' is a coordinator account" in result.stderr


def test_init_ca_refuses_to_replace_a_ca(tmp_path):
    assert invoke("init-ca", tmp_path / "ca").exit_code == 0
    ca = (tmp_path / "ca/ca.crt").read_bytes()
    result = invoke("init-ca", tmp_path / "ca")
    assert result.exit_code == 1 and "--force" in result.stderr
    assert (tmp_path / "ca/ca.crt").read_bytes() == ca
    assert invoke("init-ca", tmp_path / "ca", "--force").exit_code == 0
    assert (tmp_path / "ca/ca.crt").read_bytes() != ca
