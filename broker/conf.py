"""The shipped mosquitto configuration (broker/mosquitto.conf) and its ACL template
(broker/acl), and :func:`render_mosquitto_conf`, which moves that same configuration to
other folders and ports so that tests and bare-metal installs run exactly the shipped
file, not a look-alike.
"""

from __future__ import annotations

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

# Folders of the official image, in the order they are rewritten.
_IMAGE_DIRS = ("/mosquitto/config/", "/mosquitto/data/", "/mosquitto/log/")
_PLAIN_LISTENER = re.compile(rf"^listener {PLAIN_PORT} 127\.0\.0\.1$", re.MULTILINE)
_TLS_LISTENER = re.compile(rf"^listener {TLS_PORT}$", re.MULTILINE)


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
                          run_as: str | None = None, template: str | None = None) -> str:
    """The shipped configuration with its folders and listener ports replaced.

    Only the ``/mosquitto/config/``, ``/mosquitto/data/`` and ``/mosquitto/log/``
    prefixes and the ports of ``listener 1883 127.0.0.1`` and ``listener 8883`` change;
    every other line is the shipped one.

    Args:
        dirs: folders replacing those of the official image (made absolute).
        plain_port: TCP port of the loopback-only plain listener.
        tls_port: TCP port of the TLS listener.
        run_as: appends ``user NAME``: the account mosquitto drops to when started as
            root (default ``mosquitto``, which cannot read files owned by root with mode
            0600, such as the password file). None keeps mosquitto's default.
        template: configuration text to render instead of broker/mosquitto.conf.

    Returns:
        The configuration text.

    Raises:
        ConfigError: the template lacks one of the two listener lines, a folder or a
            port is invalid, or a setting names another /mosquitto/ path.
    """
    text = SHIPPED_CONF.read_text(encoding="utf-8") if template is None else template
    for port, what in ((plain_port, "plain_port"), (tls_port, "tls_port")):
        if not 1 <= int(port) <= 65535:
            raise ConfigError(f"{what} {port} is out of range: expected a TCP port 1..65535")
    if plain_port == tls_port:
        raise ConfigError(f"plain_port and tls_port are both {plain_port}: expected two different ports")
    text, plain_hits = _PLAIN_LISTENER.subn(f"listener {int(plain_port)} 127.0.0.1", text)
    text, tls_hits = _TLS_LISTENER.subn(f"listener {int(tls_port)}", text)
    if plain_hits != 1 or tls_hits != 1:
        raise ConfigError(f"{SHIPPED_CONF if template is None else 'template'}: expected exactly one "
                          f"'listener {PLAIN_PORT} 127.0.0.1' and one 'listener {TLS_PORT}' line, found "
                          f"{plain_hits} and {tls_hits}")
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
        text = text.rstrip("\n") + f"\n\n# Rendered for a local run.\nuser {run_as}\n"
    return text
