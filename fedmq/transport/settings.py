"""Broker connection settings: URL (and the other nodes of a broker cluster to fail over
to), MQTT protocol version, credential files, TLS files,
keepalive, persistent session, reconnect backoff and the chunk size of blob transfers.

Credentials never appear in a URL or a configuration file: the username may, the password
is read from a file (e.g. a systemd credential in ``$CREDENTIALS_DIRECTORY``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fedmq.errors import ConfigError

PROTOCOLS = ("5", "3.1.1")
#: URL scheme -> TLS. ``memory://NAME`` names an in-process bus (fedmq.transport.memory):
#: the simulator's and the unit tests' broker. ``fedmq.transport.register_link`` adds the
#: scheme of every link registered later.
SCHEMES = {"mqtt": False, "tcp": False, "mqtts": True, "ssl": True, "memory": False}
DEFAULT_PORTS = {False: 1883, True: 8883}
#: Default largest chunk payload of a blob transfer (bytes). 256 KiB is near the loopback
#: throughput plateau (docs/wire-format.md) and fits every broker but AWS IoT (128 KB).
DEFAULT_MAX_CHUNK = 256 * 1024


def parse_broker_url(url: str) -> tuple[str, int, bool]:
    """Split a broker URL into ``(host, port, tls)``.

    Accepted: ``mqtt://host[:port]`` and ``tcp://...`` (plain, port 1883), ``mqtts://host[:port]``
    and ``ssl://...`` (TLS, port 8883), ``host``, ``host:port``, ``[v6addr]:port``;
    ``memory://NAME`` for an in-process bus (host: the bus name).

    Raises:
        ConfigError: unknown scheme, bad port, empty host, credentials or a path in the URL.
    """
    if not isinstance(url, str) or not url.strip():
        raise ConfigError(f"broker url {url!r} is empty: expected mqtt://host:port or mqtts://host:port")
    text = url.strip()
    if "://" not in text:
        text = "mqtt://" + text
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ConfigError(f"broker url {url!r}: scheme {scheme!r} unsupported, expected one of {sorted(SCHEMES)}")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(f"broker url {url!r} carries credentials: put the username in 'username' and the "
                          "password in a file named by 'password_file'")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"broker url {url!r}: expected no path, query or fragment")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"broker url {url!r}: port must be an integer in 1..65535") from None
    host = parts.hostname
    if not host:
        raise ConfigError(f"broker url {url!r}: no host")
    tls = SCHEMES[scheme]
    return host, port if port else DEFAULT_PORTS[tls], tls


def read_secret(path: str | os.PathLike[str], what: str) -> str:
    """The first line of a credential file, without its line ending.

    Raises:
        ConfigError: the file is missing, unreadable, not UTF-8 or empty (names the path).
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what}: file {p} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what}: cannot read {p} ({exc})") from None
    value = text.splitlines()[0] if text else ""
    if not value:
        raise ConfigError(f"{what}: file {p} is empty, expected the secret on its first line")
    return value


@dataclass(frozen=True)
class BrokerSettings:
    """How to reach and talk to the MQTT broker.

    Attributes:
        url: ``mqtt://host:port`` (plain) or ``mqtts://host:port`` (TLS); see :func:`parse_broker_url`.
        failover_urls: the other nodes of a broker cluster (same scheme as ``url``; empty by
            default). The link connects to the first of ``url, *failover_urls`` that accepts
            the connection, and after any drop reconnects to the next one in that order,
            round robin (a killed node's clients move to a live node on their first attempt).
            Every node must serve the same users, subscriptions and retained messages
            (docs/scale.md says what a cluster keeps across nodes).
        retain_urls: the coordinator's side of a cluster that keeps retained messages per
            node (RabbitMQ 3.x): the other nodes, same scheme as ``url``; every retained
            publish is also sent to each (fedmq.transport.cluster). Empty by default.
        protocol: ``"5"`` (default; MQTT 5: persistent sessions, broker's Maximum Packet
            Size) or ``"3.1.1"`` (the embedded amqtt broker speaks only 3.1.1).
        username: broker username (on fleets, the device id); None for anonymous.
        username_file: file holding the username (first line); overrides ``username``.
        password_file: file holding the password (first line); needs a username.
        ca_file: PEM CA bundle to verify the broker (TLS; the system store when None).
        cert_file, key_file: PEM client certificate and key (mutual TLS); both or neither.
        tls_insecure: skip the broker hostname check (test certificates only).
        keepalive: MQTT keepalive, seconds (default 30).
        session_expiry: MQTT 5 Session Expiry Interval, seconds. > 0 makes the session
            persistent (clean_start False): the broker keeps subscriptions and queued QoS 1
            messages while the client is away, for this long. 0 (default) = clean session.
            Ignored with 3.1.1 (always a clean session there).
        reconnect_min, reconnect_max: reconnect backoff bounds, seconds; the delay doubles
            after each failed attempt, and each client draws its start in
            [0.5, 1.5] x reconnect_min so that a fleet does not reconnect in lockstep.
        connect_timeout: seconds :meth:`MqttLink.connect` waits for the first CONNACK.
        max_chunk: largest chunk payload of a blob transfer, bytes (default 256 KiB); also
            capped by the broker's Maximum Packet Size minus the packet header.
    """

    url: str = "mqtt://127.0.0.1:1883"
    failover_urls: tuple[str, ...] = ()
    retain_urls: tuple[str, ...] = ()
    protocol: str = "5"
    username: str | None = None
    username_file: str | None = None
    password_file: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    tls_insecure: bool = False
    keepalive: int = 30
    session_expiry: int = 0
    reconnect_min: float = 0.5
    reconnect_max: float = 30.0
    connect_timeout: float = 10.0
    max_chunk: int = DEFAULT_MAX_CHUNK

    def __post_init__(self) -> None:
        tls = parse_broker_url(self.url)[2]
        for name in ("failover_urls", "retain_urls"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)):
                raise ConfigError(f"broker {name} {value!r}: expected a list of broker URLs")
            object.__setattr__(self, name, tuple(value))
            if value and self.url.strip().lower().startswith("memory://"):
                raise ConfigError(f"broker {name}: an in-process bus ({self.url!r}) has no other nodes")
            for other in value:
                if parse_broker_url(other)[2] != tls:
                    raise ConfigError(f"broker {name}: {other!r} does not use the scheme of url {self.url!r} "
                                      "(every node of a cluster is reached the same way, with the same TLS files)")
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"broker protocol {self.protocol!r} unsupported, expected one of {PROTOCOLS}")
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError("broker cert_file and key_file: give both (mutual TLS) or neither")
        if (self.ca_file or self.cert_file) and not self.tls:
            raise ConfigError(f"broker url {self.url!r} is plain MQTT but TLS files are set: use mqtts://")
        if self.keepalive < 5 or self.session_expiry < 0 or self.connect_timeout <= 0:
            raise ConfigError("broker keepalive >= 5 s, session_expiry >= 0 s, connect_timeout > 0 s expected")
        if not 0 < self.reconnect_min <= self.reconnect_max:
            raise ConfigError("broker reconnect_min must be > 0 and <= reconnect_max (seconds)")
        if self.max_chunk < 1024:
            raise ConfigError(f"broker max_chunk {self.max_chunk} too small: expected >= 1024 bytes")
        for name in ("username_file", "password_file", "ca_file", "cert_file", "key_file"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_file():
                raise ConfigError(f"broker {name}: file {value} does not exist")

    @property
    def urls(self) -> tuple[str, ...]:
        """``url`` followed by ``failover_urls``: every node the link may connect to, in order."""
        return (self.url, *self.failover_urls)

    @property
    def host(self) -> str:
        return parse_broker_url(self.url)[0]

    @property
    def port(self) -> int:
        return parse_broker_url(self.url)[1]

    @property
    def tls(self) -> bool:
        return parse_broker_url(self.url)[2]

    @property
    def persistent(self) -> bool:
        """True when the broker keeps this client's session across disconnects (MQTT 5 only)."""
        return self.protocol == "5" and self.session_expiry > 0

    def credentials(self) -> tuple[str | None, str | None]:
        """``(username, password)`` read from the files now (so that a rotated password is
        picked up on the next connection).

        Raises:
            ConfigError: a file is unreadable, or a password is given without a username.
        """
        user = read_secret(self.username_file, "broker username_file") if self.username_file else self.username
        password = read_secret(self.password_file, "broker password_file") if self.password_file else None
        if password is not None and not user:
            raise ConfigError("broker password_file is set but no username / username_file")
        return user, password

    def with_(self, **changes: Any) -> BrokerSettings:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], where: str = "broker") -> BrokerSettings:
        """Build from a configuration table (e.g. the ``[broker]`` table of a TOML file).
        Relative file paths are kept as given.

        Raises:
            ConfigError: unknown key (named, with ``where``) or invalid value.
        """
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"{where}: unknown option(s) {unknown}, expected some of {sorted(known)}")
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            default = known[key].default
            if key == "protocol":
                value = str(value)
            elif key in ("failover_urls", "retain_urls"):
                if not isinstance(value, (list, tuple)) or not all(isinstance(u, str) for u in value):
                    raise ConfigError(f"{where}.{key}: expected a list of broker URLs, got {value!r}")
                value = tuple(value)
            elif isinstance(default, bool):
                if not isinstance(value, bool):
                    raise ConfigError(f"{where}.{key}: expected true/false, got {value!r}")
            elif isinstance(default, (int, float)) and not isinstance(default, bool):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ConfigError(f"{where}.{key}: expected a number, got {value!r}")
                value = type(default)(value)
            elif value is not None and not isinstance(value, str):
                raise ConfigError(f"{where}.{key}: expected a string, got {value!r}")
            kwargs[key] = value
        try:
            return cls(**kwargs)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
