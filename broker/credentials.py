"""Broker credentials: mosquitto password files, the ACL's coordinator accounts, and a
local certificate authority issuing the broker's server certificate and device client
certificates.

Password hashes follow mosquitto 2.0's ``sha512-pbkdf2`` format (``mosquitto_passwd``,
src/password_mosq.c): ``$7$ITERATIONS$SALT$HASH`` with a 12-byte random salt, HASH =
PBKDF2-HMAC-SHA512(password, salt, ITERATIONS) of 64 bytes, both in standard base64 with
padding, ITERATIONS 101 by default. :func:`hash_password` writes it, so fedmq can add
users where mosquitto_passwd is not installed; :func:`set_password` prefers
mosquitto_passwd where it is.

Keys are ECDSA P-256 (fast on small devices, supported by every TLS stack mosquitto and
paho use); certificates are X.509 v3 made with the ``cryptography`` library.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import ipaddress
import os
import re
import secrets
import shutil
import stat
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker.conf import SHIPPED_ACL
from fedmq.storage.atomic import atomic_write_bytes, atomic_write_text
from fedmq.errors import ConfigError, FedmqError
from fedmq.wire.topics import check_id

#: PBKDF2 iterations mosquitto_passwd 2.0 uses (its PW_DEFAULT_ITERATIONS).
PBKDF2_ITERATIONS = 101
#: Salt length mosquitto_passwd 2.0 uses, bytes.
SALT_BYTES = 12
#: Random bytes in a generated password (32 URL-safe characters).
PASSWORD_BYTES = 24
#: Validity of the CA certificate, days.
CA_DAYS = 3650
#: Default validity of server and client certificates, days.
LEAF_DAYS = 825
#: Seconds mosquitto_passwd may take to update a password file.
MOSQUITTO_PASSWD_TIMEOUT = 30.0

#: Mode of a folder of secrets fedmq creates (certs/, devices/NAME/, coordinators/NAME/):
#: only the owner may list or enter it, whatever the umask.
PRIVATE_DIR_MODE = 0o700
#: Mode of the auth/ folder fedmq creates: the broker may enter it through its group
#: (the docker image's mosquitto runs as gid 1883 and reads passwd, mode 0640, so).
AUTH_DIR_MODE = 0o750

HASHERS = ("auto", "mosquitto_passwd", "fedmq")
_HASH = re.compile(r"^\$7\$(\d+)\$([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+)$")


class CredentialError(FedmqError):
    """A password file, ACL file or certificate cannot be read, written or issued
    (the message names the path and what was expected)."""


# --- Passwords -------------------------------------------------------------------

def generate_password() -> str:
    """A new random password: 32 characters of ``[A-Za-z0-9_-]`` (192 bits)."""
    return secrets.token_urlsafe(PASSWORD_BYTES)


def hash_password(password: str, *, iterations: int = PBKDF2_ITERATIONS, salt: bytes | None = None) -> str:
    """mosquitto 2.0 ``sha512-pbkdf2`` hash of ``password``.

    Args:
        password: the password (UTF-8 encoded before hashing).
        iterations: PBKDF2 iterations (mosquitto_passwd 2.0 uses 101).
        salt: salt bytes; 12 random bytes when None.

    Returns:
        ``$7$ITERATIONS$SALT_B64$HASH_B64`` (standard base64 with padding).
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(password: str, encoded: str) -> bool:
    """True if ``password`` matches a ``$7$`` hash (mosquitto's or fedmq's); False for a
    wrong password or a hash in any other format."""
    match = _HASH.match(encoded)
    if not match:
        return False
    try:
        salt = base64.b64decode(match.group(2), validate=True)
        expected = base64.b64decode(match.group(3), validate=True)
    except ValueError:
        return False
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, int(match.group(1)))
    return hmac.compare_digest(digest, expected)


def read_password_file(path: Path) -> dict[str, str]:
    """Users of a mosquitto password file: ``{user name: hash}`` (a missing file is empty).

    Raises:
        CredentialError: the file cannot be read or a line is not ``user:hash``.
    """
    path = Path(path)
    if not path.exists():
        return {}
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CredentialError(f"{path}: cannot read password file ({exc})") from None
    users: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        user, sep, encoded = line.partition(":")
        if not sep or not user:
            raise CredentialError(f"{path}:{number}: expected 'username:hash', got {line[:40]!r}")
        users[user] = encoded
    return users


def mosquitto_passwd_binary() -> str | None:
    """Path of mosquitto_passwd (PATH, then /usr/bin and /usr/sbin), None if not installed."""
    return shutil.which("mosquitto_passwd") or shutil.which("mosquitto_passwd", path="/usr/bin:/usr/sbin")


def set_password(path: Path, user: str, password: str, *, hasher: str = "auto") -> str:
    """Add ``user`` to the password file ``path`` (created with mode 0600 if missing) or
    replace its password. An existing file keeps its mode and group.

    Args:
        path: mosquitto password file.
        user: broker user name (a fedmq id: device id or coordinator account).
        password: the password in clear.
        hasher: ``"mosquitto_passwd"`` (run it; the password goes through its stdin, never
            its command line), ``"fedmq"`` (:func:`hash_password`, file written atomically)
            or ``"auto"`` (mosquitto_passwd where installed, else fedmq).

    Returns:
        The hasher used: ``"mosquitto_passwd"`` or ``"fedmq"``.

    Raises:
        ConfigError: ``user`` is not a valid id, ``password`` empty or multi-line, or
            ``hasher`` unknown.
        CredentialError: the file is unreadable or malformed, its folder cannot be written,
            mosquitto_passwd is required but missing, or it failed.
    """
    check_id(user, "broker user name")
    if any(c in password for c in "\n\r\0") or not password:
        raise ConfigError(f"password of {user!r} is invalid: expected a non-empty single line")
    if hasher not in HASHERS:
        raise ConfigError(f"hasher {hasher!r} is unknown: expected one of {', '.join(HASHERS)}")
    path = Path(path)
    users = read_password_file(path)  # refuses a malformed file before anything is written
    binary = mosquitto_passwd_binary() if hasher != "fedmq" else None
    if hasher == "mosquitto_passwd" and binary is None:
        raise CredentialError("mosquitto_passwd not found (PATH, /usr/bin, /usr/sbin): install mosquitto-clients "
                              "or use --hasher fedmq")
    try:
        make_dirs(path.parent, AUTH_DIR_MODE)
        before = path.stat() if path.exists() else None
        if binary is None:
            users[user] = hash_password(password)
            atomic_write_text(path, "".join(f"{name}:{encoded}\n" for name, encoded in users.items()))
            _keep_mode(path, before)
            return "fedmq"
        if not path.exists():
            # mosquitto_passwd without -c updates an existing file only; -c would need the
            # password on the command line (-b). An empty file created 0600 keeps it private.
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as exc:
        raise CredentialError(f"{path}: cannot write password file ({exc})") from None
    try:
        proc = subprocess.run([binary, str(path), user], input=f"{password}\n{password}\n", text=True,
                              capture_output=True, timeout=MOSQUITTO_PASSWD_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CredentialError(f"{binary} failed on {path}: {exc}") from None
    if proc.returncode != 0:
        raise CredentialError(f"{binary} {path} {user} exited with status {proc.returncode}: "
                              f"{(proc.stderr or proc.stdout).strip()}")
    try:
        # mosquitto_passwd writes its new file through the caller's umask.
        _keep_mode(path, before)
    except OSError as exc:
        raise CredentialError(f"{path}: cannot set the mode of the password file ({exc})") from None
    return "mosquitto_passwd"


def _keep_mode(path: Path, before: os.stat_result | None) -> None:
    """Give a rewritten password file the old file's mode and group, or 0600 when new.

    The broker may read the file through its group (chgrp 1883, mode 0640 for the docker
    image), so a rewrite must not take that away; a new file is the owner's only."""
    if before is None:
        os.chmod(path, 0o600)
        return
    os.chmod(path, stat.S_IMODE(before.st_mode))
    try:
        os.chown(path, -1, before.st_gid)
    except PermissionError:
        pass


# --- ACL: coordinator and reader accounts ---------------------------------------

_ACCOUNTS_MARK = "# --- Accounts added by fedmq broker add-coordinator / add-device (do not edit by hand) ---"
#: Suffix of a device's read-only companion account (``pi-01.predict`` for ``pi-01``),
#: made by ``fedmq broker add-device`` for a second connection of the device, such as
#: ``fedmq edge predict`` beside the running agent: the broker binds client ids to user
#: names, so a second connection under the device's own name would close the agent's.
READER_SUFFIX = ".predict"


def reader_account(device: str) -> str:
    """The read-only companion account of ``device``: ``device + READER_SUFFIX``.

    Raises:
        ConfigError: the result is not a valid id (a device id longer than 56 characters).
    """
    return check_id(device + READER_SUFFIX, f"companion account of device {device!r} (at most "
                    f"{64 - len(READER_SUFFIX)} characters before {READER_SUFFIX!r})")


def reader_rules(shipped_acl: str | None = None) -> list[str]:
    """The rules of a reader account's ``user`` block: one ``topic deny`` for every
    device pattern of the shipped ACL that names ``%u``, cut at that level (``pattern
    write fedmq/+/update/%u/#`` gives ``topic deny fedmq/+/update/#``).

    mosquitto checks a user's own rules before the patterns and a deny ends the check,
    so a reader keeps only the device rights that name no user: reading the global
    models, their ONNX exports and round announcements. Derived from broker/acl so that a
    device right added there is denied to readers without a second list to keep in step.
    """
    text = SHIPPED_ACL.read_text(encoding="utf-8") if shipped_acl is None else shipped_acl
    rules: list[str] = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "pattern" and "%u" in parts[2].split("/"):
            levels = parts[2].split("/")
            rule = "topic deny " + "/".join(levels[:levels.index("%u")] + ["#"])
            if rule not in rules:
                rules.append(rule)
    return rules


@dataclass
class AclAccounts:
    """The accounts of a deployed ACL file that have a ``user`` block.

    Attributes:
        coordinators: ``{user name: [federation, ...]}``: read and write on ``fedmq/F/#``.
        readers: user names of read-only companion accounts (:data:`READER_SUFFIX`).
        bridges: ``{user name: [rule, ...]}``: site bridge accounts, blocks of ``topic read``
            / ``topic write`` rules under ``fedmq/`` only (broker/bridge/central-acl,
            ``fedmq broker bridge-config``), kept as they are.
    """

    coordinators: dict[str, list[str]]
    readers: list[str]
    bridges: dict[str, list[str]] = field(default_factory=dict)


def read_acl(acl_path: Path) -> AclAccounts:
    """Accounts of an ACL file, read from its ``user NAME`` blocks (a missing file has none).

    A block of ``topic readwrite fedmq/F/#`` lines is a coordinator account; a block of
    exactly :func:`reader_rules` is a reader account; a block of ``topic read`` and
    ``topic write`` rules under ``fedmq/`` is a site bridge account.

    Raises:
        CredentialError: the file cannot be read, or a ``user`` block holds another rule
            (fedmq writes only these; a hand-written rule would be lost on the next rewrite).
    """
    acl_path = Path(acl_path)
    if not acl_path.exists():
        return AclAccounts({}, [])
    try:
        lines = acl_path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise CredentialError(f"{acl_path}: cannot read ACL file ({exc})") from None
    blocks: dict[str, list[tuple[int, str]]] = {}
    current: str | None = None
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("user "):
            current = line[5:].strip()
            blocks.setdefault(current, [])
        elif current is not None:
            blocks[current].append((number, line))
    coordinator_rule = re.compile(r"^topic readwrite fedmq/([A-Za-z0-9_.-]{1,64})/#$")
    bridge_rule = re.compile(r"^topic (read|write) fedmq/[A-Za-z0-9_.+#/-]+$")
    denies = reader_rules()
    coordinators: dict[str, list[str]] = {}
    readers: list[str] = []
    bridges: dict[str, list[str]] = {}
    for user, rules in blocks.items():
        if rules and {line for _, line in rules} == set(denies):
            readers.append(user)
            continue
        if rules and all(bridge_rule.match(line) for _, line in rules):
            bridges[user] = [line for _, line in rules]
            continue
        feds = coordinators.setdefault(user, [])
        for number, line in rules:
            match = coordinator_rule.match(line)
            if not match:
                raise CredentialError(f"{acl_path}:{number}: unexpected rule {line!r} in the block of user {user!r}: "
                                      f"expected 'topic readwrite fedmq/FEDERATION/#' (a coordinator) or exactly "
                                      f"the rules of a reader account (fedmq rewrites these blocks)")
            if match.group(1) not in feds:
                feds.append(match.group(1))
    return AclAccounts(coordinators, sorted(readers), bridges)


def coordinator_accounts(acl_path: Path) -> dict[str, list[str]]:
    """Coordinator accounts of an ACL file: ``{user name: [federation, ...]}`` (see
    :func:`read_acl`, whose errors it raises)."""
    return read_acl(acl_path).coordinators


def render_acl(accounts: dict[str, list[str]], readers: list[str] | tuple[str, ...] = (),
               bridges: dict[str, list[str]] | None = None) -> str:
    """The shipped ACL (broker/acl) followed by one ``user`` block per coordinator account,
    granting it read and write on its federations' trees ``fedmq/F/#``, one per
    reader account, denying it every device right that names its user (:func:`reader_rules`),
    and one per site bridge account with its rules as given."""
    text = SHIPPED_ACL.read_text(encoding="utf-8").rstrip("\n") + "\n"
    if accounts or readers or bridges:
        text += f"\n{_ACCOUNTS_MARK}\n"
        for user in sorted(accounts):
            text += f"\nuser {user}\n" + "".join(f"topic readwrite fedmq/{fed}/#\n" for fed in accounts[user])
        denies = "".join(f"{rule}\n" for rule in reader_rules())
        for user in sorted(set(readers)):
            text += f"\nuser {user}\n{denies}"
        for user in sorted(bridges or {}):
            text += f"\nuser {user}\n" + "".join(f"{rule}\n" for rule in (bridges or {})[user])
    return text


def write_acl(acl_path: Path, accounts: dict[str, list[str]] | AclAccounts) -> None:
    """Write :func:`render_acl` to ``acl_path`` atomically (mode 0644: it holds no secret;
    a folder made for it gets mode 0750, see :data:`AUTH_DIR_MODE`).

    Args:
        acl_path: the deployed ACL file.
        accounts: every account with a ``user`` block, or only the coordinator accounts
            (then the file has no reader account).

    Raises:
        CredentialError: the folder cannot be written.
    """
    if isinstance(accounts, AclAccounts):
        text = render_acl(accounts.coordinators, accounts.readers, accounts.bridges)
    else:
        text = render_acl(accounts)
    write_file(Path(acl_path), text.encode("utf-8"), 0o644, "ACL file", dir_mode=AUTH_DIR_MODE)


# --- Certificates -----------------------------------------------------------------

@dataclass(frozen=True)
class CaFiles:
    """Files of a local CA folder made by :func:`init_ca`."""

    folder: Path

    @property
    def ca_cert(self) -> Path:
        return self.folder / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.folder / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.folder / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.folder / "server.key"


def make_dirs(folder: Path, mode: int) -> None:
    """Create ``folder`` and its missing parents, each with exactly ``mode`` whatever the
    umask (mkdir applies the umask; an explicit chmod follows). Folders that exist keep
    their mode: an operator may have opened one to the broker's group on purpose.

    Raises:
        OSError: a folder cannot be created.
    """
    folder = Path(folder)
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for created in reversed(missing):
        try:
            created.mkdir(mode=mode)
        except FileExistsError:
            continue  # made by someone else meanwhile: theirs, not ours to chmod
        os.chmod(created, mode)


def write_file(path: Path, data: bytes, mode: int, what: str, *, dir_mode: int = PRIVATE_DIR_MODE) -> None:
    """Write ``data`` to ``path`` atomically (fedmq.storage.atomic) and set its mode (0600 for
    secrets: the temporary file is 0600 from the start, so a secret is never readable by
    others, not even for an instant). Missing folders are created with ``dir_mode``.

    Raises:
        CredentialError: naming ``path`` and ``what`` it is, when it cannot be written.
    """
    try:
        make_dirs(Path(path).parent, dir_mode)
        atomic_write_bytes(path, data)
        os.chmod(path, mode)
    except OSError as exc:
        raise CredentialError(f"{path}: cannot write {what} ({exc})") from None


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedmq"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(hostnames: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hostnames:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not re.fullmatch(r"[A-Za-z0-9*]([A-Za-z0-9.*-]{0,252})", host):
                raise ConfigError(f"hostname {host!r} is invalid: expected a DNS name or an IP address") from None
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _leaf(subject: str, public_key: ec.EllipticCurvePublicKey, ca_cert: x509.Certificate,
          ca_key: ec.EllipticCurvePrivateKey, days: int, usage: x509.ObjectIdentifier,
          san: x509.SubjectAlternativeName | None) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(_name(subject)).issuer_name(ca_cert.subject).public_key(public_key)
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, content_commitment=False,
                                            data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def init_ca(folder: Path, hostnames: list[str] | None = None, *, days: int = LEAF_DAYS,
            force: bool = False) -> CaFiles:
    """Create a local CA and the broker's server certificate in ``folder``.

    Writes ``ca.crt`` (0644), ``ca.key`` (0600), ``server.crt`` (0644) and ``server.key``
    (0600). The CA is valid CA_DAYS days and may sign only end-entity certificates
    (path length 0); the server certificate names ``hostnames`` (DNS names and IP
    addresses, default ``localhost`` and ``127.0.0.1``) and is valid ``days`` days.

    Raises:
        ConfigError: a hostname is invalid or ``days`` < 1.
        CredentialError: ``folder`` already holds a CA and ``force`` is False, or a file
            cannot be written.
    """
    if days < 1:
        raise ConfigError(f"days {days} is invalid: expected >= 1")
    files = CaFiles(Path(folder))
    san = _san(hostnames or ["localhost", "127.0.0.1"])
    if not force and (files.ca_cert.exists() or files.ca_key.exists()):
        raise CredentialError(f"{files.folder}: a CA already exists (ca.crt / ca.key); refusing to replace it, which "
                              f"would invalidate every certificate it issued (use --force to replace it)")
    ca_key = _new_key()
    now = dt.datetime.now(dt.timezone.utc)
    ca_name = _name("fedmq local CA")
    ca_cert = (x509.CertificateBuilder()
               .subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=CA_DAYS))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=False, key_encipherment=False, content_commitment=False,
                                            data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                            crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
               .sign(ca_key, hashes.SHA256()))
    server_key = _new_key()
    server_cert = _leaf(str(hostnames[0]) if hostnames else "localhost", server_key.public_key(), ca_cert, ca_key,
                        days, ExtendedKeyUsageOID.SERVER_AUTH, san)
    # Key first: a crash leaves a key without a certificate, never a certificate whose key is lost.
    write_file(files.ca_key, _key_pem(ca_key), 0o600, "CA key")
    write_file(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644, "CA certificate")
    write_file(files.server_key, _key_pem(server_key), 0o600, "server key")
    write_file(files.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), 0o644, "server certificate")
    return files


def load_ca(folder: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA certificate and key of a folder made by :func:`init_ca`.

    Raises:
        CredentialError: a file is missing or is not a PEM certificate / private key.
    """
    files = CaFiles(Path(folder))
    for path in (files.ca_cert, files.ca_key):
        if not path.is_file():
            raise CredentialError(f"{path}: not found; expected the CA made by 'fedmq broker init-ca {files.folder}'")
    try:
        cert = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    except (OSError, ValueError) as exc:
        raise CredentialError(f"{files.ca_cert}: not a PEM certificate ({exc})") from None
    try:
        key = serialization.load_pem_private_key(files.ca_key.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise CredentialError(f"{files.ca_key}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise CredentialError(f"{files.ca_key}: does not belong to {files.ca_cert}")
    return cert, key


def issue_client_cert(ca_folder: Path, name: str, cert_path: Path, key_path: Path, *,
                      days: int = LEAF_DAYS) -> x509.Certificate:
    """Issue a client certificate (CN = ``name``, extended key usage clientAuth) signed by
    the CA in ``ca_folder``; write it (0644) and its new private key (0600).

    Raises:
        ConfigError: ``name`` is not a valid id or ``days`` < 1.
        CredentialError: the CA cannot be loaded or a file cannot be written.
    """
    check_id(name, "certificate name")
    if days < 1:
        raise ConfigError(f"days {days} is invalid: expected >= 1")
    ca_cert, ca_key = load_ca(ca_folder)
    key = _new_key()
    cert = _leaf(name, key.public_key(), ca_cert, ca_key, days, ExtendedKeyUsageOID.CLIENT_AUTH, None)
    write_file(Path(key_path), _key_pem(key), 0o600, "client key")
    write_file(Path(cert_path), cert.public_bytes(serialization.Encoding.PEM), 0o644, "client certificate")
    return cert
