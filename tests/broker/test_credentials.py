"""Password hashes in mosquitto's format, password files, ACL accounts, and the local CA.
(mosquitto accepting these files is tested in test_mosquitto_access.py.)"""

from __future__ import annotations

import base64
import hashlib
import stat
import subprocess

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from broker import credentials as cred


def test_hash_matches_mosquitto_passwd_format_and_verifies_its_hashes(tmp_path):
    encoded = cred.hash_password("s3cret", salt=b"0123456789ab")
    expected = base64.b64encode(hashlib.pbkdf2_hmac("sha512", b"s3cret", b"0123456789ab", 101)).decode()
    assert encoded == f"$7$101${base64.b64encode(b'0123456789ab').decode()}${expected}"
    assert cred.verify_password("s3cret", cred.hash_password("s3cret"))

    passwd = tmp_path / "passwd"
    passwd.touch()
    binary = cred.mosquitto_passwd_binary()
    assert binary, "mosquitto_passwd must be installed for this test (apt-get install mosquitto)"
    subprocess.run([binary, "-b", str(passwd), "alice", "pa:ss wörd"], check=True, capture_output=True, timeout=30)
    theirs = cred.read_password_file(passwd)["alice"]
    assert cred.verify_password("pa:ss wörd", theirs)
    assert not cred.verify_password("pa:ss word", theirs)
    assert not cred.verify_password("x", "$6$notours$abc")


@pytest.mark.parametrize("hasher", ["mosquitto_passwd", "fedmq"])
def test_set_password_adds_and_replaces_entries_privately(tmp_path, hasher):
    passwd = tmp_path / "auth" / "passwd"
    assert cred.set_password(passwd, "dev1", "one", hasher=hasher) == hasher
    cred.set_password(passwd, "dev2", "two", hasher=hasher)
    cred.set_password(passwd, "dev1", "uno", hasher=hasher)
    users = cred.read_password_file(passwd)
    assert sorted(users) == ["dev1", "dev2"]
    assert cred.verify_password("uno", users["dev1"]) and cred.verify_password("two", users["dev2"])
    assert stat.S_IMODE(passwd.stat().st_mode) == 0o600
    passwd.chmod(0o640)  # as for the docker image's broker, reading through its group
    cred.set_password(passwd, "dev3", "three", hasher=hasher)
    assert stat.S_IMODE(passwd.stat().st_mode) == 0o640
    assert sorted(cred.read_password_file(passwd)) == ["dev1", "dev2", "dev3"]


def test_coordinator_accounts_round_trip_through_the_acl(tmp_path):
    acl = tmp_path / "acl"
    assert cred.coordinator_accounts(acl) == {}
    cred.write_acl(acl, {"coord": ["f1", "f2"], "other": ["f3"]})
    assert cred.coordinator_accounts(acl) == {"coord": ["f1", "f2"], "other": ["f3"]}
    text = acl.read_text()
    assert text.startswith(cred.SHIPPED_ACL.read_text())
    assert "user coord\ntopic readwrite fedmq/f1/#\ntopic readwrite fedmq/f2/#\n" in text


def test_ca_issues_server_and_client_certificates(tmp_path):
    files = cred.init_ca(tmp_path / "ca", ["broker.example.org", "10.0.0.7"])
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["broker.example.org"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.7"]
    assert ExtendedKeyUsageOID.SERVER_AUTH in server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca

    client = cred.issue_client_cert(files.folder, "dev1", tmp_path / "d/client.crt", tmp_path / "d/client.key")
    client.verify_directly_issued_by(ca)
    assert client.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "dev1"
    for key in (files.ca_key, files.server_key, tmp_path / "d/client.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(files.ca_cert.stat().st_mode) == 0o644


def test_load_ca_names_missing_and_mismatched_files(tmp_path):
    with pytest.raises(cred.CredentialError, match=r"ca\.crt: not found"):
        cred.load_ca(tmp_path / "nothing")
    first = cred.init_ca(tmp_path / "a")
    second = cred.init_ca(tmp_path / "b")
    second.ca_key.write_bytes(first.ca_key.read_bytes())
    with pytest.raises(cred.CredentialError, match="does not belong to"):
        cred.load_ca(second.folder)
    second.ca_key.write_text("garbage")
    with pytest.raises(cred.CredentialError, match="not an unencrypted PEM private key"):
        cred.load_ca(second.folder)
