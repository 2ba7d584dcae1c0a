"""The shipped mosquitto configuration (broker/mosquitto.conf) and its ACL template
(broker/acl), and :func:`render_mosquitto_conf`, which moves that same configuration to
other folders and ports so that tests and bare-metal installs run exactly the shipped
file, not a look-alike.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from fedmq.errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent
#: The shipped configuration, written for the official eclipse-mosquitto:2 image.
SHIPPED_CONF = PACKAGE_DIR / "mosquitto.conf"
#: The shipped ACL: device patterns; coordinator blocks are appended to a deployed copy.
SHIPPED_ACL = PACKAGE_DIR / "acl"
#: Ports of the shipped listeners: plain MQTT on loopback, MQTT over TLS.
PLAIN_PORT = 1883
TLS_PORT = 8883

#: How a client authenticates on the TLS listener: ``certificate`` (shipped: a client
#: certificate from the CA is required and its CN is the user name; the password is not
#: checked there) or ``password`` (server-authenticated TLS, user name and password).
TLS_AUTH_MODES = ("certificate", "password")

# Folders of the official image, in the order they are rewritten.
_IMAGE_DIRS = ("/mosquitto/config/", "/mosquitto/data/", "/mosquitto/log/")
_PLAIN_LISTENER = re.compile(rf"^listener {PLAIN_PORT} 127\.0\.0\.1$", re.MULTILINE)
_TLS_LISTENER = re.compile(rf"^listener {TLS_PORT}$", re.MULTILINE)
# The two settings --tls-auth password turns off, as the shipped file spells them.
_CERT_IDENTITY = ("require_certificate true", "use_identity_as_username true")
_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252})$")


def check_bind(address: str, option: str, *, loopback_only: bool = False) -> str:
    """Return ``address`` if mosquitto can bind a listener to it, else raise.

    Args:
        address: an IPv4 or IPv6 address, or a host name (mosquitto resolves it).
        option: the option's name, for the message.
        loopback_only: also require a loopback address (127.0.0.0/8, ::1 or
            ``localhost``): the plain listener carries passwords in clear.

    Raises:
        ConfigError: the address is malformed, or not loopback where it must be.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        ip = None
        if not _HOSTNAME.match(address or ""):
            raise ConfigError(f"{option} {address!r} is invalid: expected an IP address or a host name") from None
    if loopback_only and not (address == "localhost" or (ip is not None and ip.is_loopback)):
        raise ConfigError(f"{option} {address!r} is not a loopback address: the plain listener sends passwords in "
                          f"clear, so it listens on loopback only (127.0.0.1, ::1 or localhost); devices on the "
                          f"network use the TLS listener")
    return address


@dataclass(frozen=True)
class BrokerDirs:
    """Where a rendered configuration looks for its files.

    Attributes:
        config: replaces ``/mosquitto/config``: holds ``auth/passwd``, ``auth/acl`` and
            ``certs/{ca.crt,server.crt,server.key}``.
        data: replaces ``/mosquitto/data`` (persistence, ``mosquitto.db``).
        log: replaces ``/mosquitto/log`` (``mosquitto.log``).
    """

    config: Path
    data: Path
    log: Path

    @property
    def passwd(self) -> Path:
        return self.config / "auth" / "passwd"

    @property
    def acl(self) -> Path:
        return self.config / "auth" / "acl"

    @property
    def certs(self) -> Path:
        return self.config / "certs"


def render_mosquitto_conf(dirs: BrokerDirs, *, plain_port: int = PLAIN_PORT, tls_port: int = TLS_PORT,
                          plain_bind: str = "127.0.0.1", tls_bind: str | None = None,
                          tls_auth: str = "certificate", run_as: str | None = None,
                          template: str | None = None) -> str:
    """The shipped configuration with its folders, listeners and TLS authentication set.

    Only the ``/mosquitto/config/``, ``/mosquitto/data/`` and ``/mosquitto/log/``
    prefixes, the lines ``listener 1883 127.0.0.1`` and ``listener 8883`` and, with
    ``tls_auth="password"``, ``require_certificate`` and ``use_identity_as_username``
    change; every other line is the shipped one.

    Args:
        dirs: folders replacing those of the official image (made absolute).
        plain_port: TCP port of the plain listener.
        tls_port: TCP port of the TLS listener.
        plain_bind: address of the plain listener; loopback only (see :func:`check_bind`).
        tls_bind: address of the TLS listener; None binds every interface, as shipped.
        tls_auth: ``"certificate"`` (shipped: client certificate required, its CN is the
            user name, the password is not checked on TLS) or ``"password"``
            (``require_certificate false``, ``use_identity_as_username false``: TLS
            authenticates the broker, the password the client).
        run_as: appends ``user NAME``: the account mosquitto drops to when started as
            root (default ``mosquitto``, which cannot read files owned by root with mode
            0600, such as the password file). None keeps mosquitto's default.
        template: configuration text to render instead of broker/mosquitto.conf.

    Returns:
        The configuration text.

    Raises:
        ConfigError: the template lacks one of the two listener lines (or, for
            ``tls_auth="password"``, the two certificate lines), a folder, port, bind
            address or ``tls_auth`` is invalid, or a setting names another /mosquitto/ path.
    """
    source = SHIPPED_CONF if template is None else "template"
    text = SHIPPED_CONF.read_text(encoding="utf-8") if template is None else template
    for port, what in ((plain_port, "plain_port"), (tls_port, "tls_port")):
        if not 1 <= int(port) <= 65535:
            raise ConfigError(f"{what} {port} is out of range: expected a TCP port 1..65535")
    if plain_port == tls_port:
        raise ConfigError(f"plain_port and tls_port are both {plain_port}: expected two different ports")
    if tls_auth not in TLS_AUTH_MODES:
        raise ConfigError(f"tls_auth {tls_auth!r} is unknown: expected one of {', '.join(TLS_AUTH_MODES)}")
    check_bind(plain_bind, "plain_bind", loopback_only=True)
    tls_listener = f"listener {int(tls_port)}"
    if tls_bind is not None:
        tls_listener += f" {check_bind(tls_bind, 'tls_bind')}"
    text, plain_hits = _PLAIN_LISTENER.subn(f"listener {int(plain_port)} {plain_bind}", text)
    text, tls_hits = _TLS_LISTENER.subn(tls_listener, text)
    if plain_hits != 1 or tls_hits != 1:
        raise ConfigError(f"{source}: expected exactly one 'listener {PLAIN_PORT} 127.0.0.1' and one "
                          f"'listener {TLS_PORT}' line, found {plain_hits} and {tls_hits}")
    if tls_auth == "password":
        for line in _CERT_IDENTITY:
            text, hits = re.subn(rf"^{line}$", line.replace(" true", " false"), text, flags=re.MULTILINE)
            if hits != 1:
                raise ConfigError(f"{source}: expected exactly one '{line}' line to turn off for tls_auth "
                                  f"'password', found {hits}")
    settings = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    stray = sorted(set(re.findall(r"/mosquitto/[^/\s]*", settings)) - {d.rstrip("/") for d in _IMAGE_DIRS})
    if stray:
        raise ConfigError(f"mosquitto.conf names image paths {stray} that cannot be rendered: expected only "
                          f"{', '.join(_IMAGE_DIRS)}")
    for image_dir, folder in zip(_IMAGE_DIRS, (dirs.config, dirs.data, dirs.log), strict=True):
        target = Path(folder).resolve()
        if any(c in str(target) for c in "\n\r#"):
            raise ConfigError(f"folder {str(target)!r} cannot appear in mosquitto.conf: no newline or '#'")
        text = text.replace(image_dir, f"{target}{os.sep}")
    if run_as is not None:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}", run_as):
            raise ConfigError(f"run_as {run_as!r} is invalid: expected a system user name")
        text = text.rstrip("\n") + f"\n\n# Rendered for a local run.\nuser {run_as}\n"
    return text
