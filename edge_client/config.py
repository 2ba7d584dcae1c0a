"""Edge client configuration: one TOML file, every option overridable from the environment.

The file has top-level options (``device_id``, ``task``, ...) and one table, ``[broker]``,
named like the coordinator's: ``url``, ``protocol``, ``username_file``, ``password_file``,
``ca_file``, ``cert_file``, ``key_file``, ``keepalive``, ``session_expiry``. The flat names
of fedmq 0.1 (``broker_url``, ``tls_ca``, ``tls_cert``, ``tls_key``, top-level
``username_file``, ...) still work; each logs one deprecation warning naming the file,
the old and the new name.

Each option can be overridden by the environment variable ``FEDMQ_EDGE_<OPTION>``, upper
case, a table's options with the table's name in front (``FEDMQ_EDGE_DEVICE_ID``,
``FEDMQ_EDGE_BROKER_CA_FILE``); values are strings, converted and validated like file
values. A ``FEDMQ_EDGE_*`` variable that names no option is an error naming the closest
option. Options, types, defaults and units are in docs/edge-client.md and on
:class:`EdgeConfig` (whose attributes keep the 0.1 names: ``broker_url``, ``tls_ca``, ...).

Under systemd (deploy/fedmq-edge.service):

* the default file is ``$CONFIGURATION_DIRECTORY/edge.toml``;
* ``state_dir`` defaults to ``$STATE_DIRECTORY``;
* a relative ``username_file`` / ``password_file`` / ``tls_*`` path is looked up in
  ``$CREDENTIALS_DIRECTORY`` (filled by ``LoadCredential=``) when that is set, else
  relative to the configuration file's folder.

Every problem raises :class:`fedmq.errors.ConfigError` naming the file, the option and
what was expected.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from fedmq.errors import ConfigError
from fedmq.settings_file import read_toml
from fedmq.testhooks import hook_variables
from fedmq.topics import check_id
from fedmq.transport.settings import parse_broker_url

ENV_PREFIX = "FEDMQ_EDGE_"
DEFAULT_FILE_NAME = "edge.toml"

log = logging.getLogger(__name__)

#: ``[broker]`` option -> :class:`EdgeConfig` attribute (same names as the coordinator's
#: ``[broker]`` table, fedmq.transport.BrokerSettings).
BROKER_OPTIONS = {"url": "broker_url", "protocol": "protocol", "username_file": "username_file",
                  "password_file": "password_file", "ca_file": "tls_ca", "cert_file": "tls_cert",
                  "key_file": "tls_key", "keepalive": "keepalive", "session_expiry": "session_expiry",
                  "failover_urls": "broker_failover_urls"}
#: Attribute -> the option's name in the file (``broker.ca_file``) for messages.
_FILE_NAMES = {attr: f"broker.{opt}" for opt, attr in BROKER_OPTIONS.items()}
#: fedmq 0.1's flat top-level names, kept working (deprecated): old name -> attribute.
DEPRECATED_NAMES = {attr: attr for attr in BROKER_OPTIONS.values() if attr != "broker_failover_urls"}
#: Variables with the prefix that are not options: the agent's test hook (edge_client.agent).
_NOT_OPTIONS = hook_variables("FEDMQ_EDGE")
_warned: set[tuple[str, str]] = set()


class EdgeConfig(BaseModel):
    """Validated edge client settings (see docs/edge-client.md for the reference table).

    Attributes:
        broker_url: ``mqtt://host[:port]`` or ``mqtts://host[:port]`` (TLS), default port
            1883 / 8883.
        broker_failover_urls: option ``broker.failover_urls``: the other nodes of a broker
            cluster, same scheme (environment: URLs separated by commas); the agent moves
            to the next one when its node refuses or drops it
            (fedmq.transport.BrokerSettings.failover_urls). Empty by default.
        protocol: MQTT protocol version, ``"5"`` (persistent session with expiry; default)
            or ``"3.1.1"`` (clean_session=False).
        tls_ca, tls_cert, tls_key: PEM files: CA bundle to verify the broker; client
            certificate and key for mutual TLS. Unset: system CAs (mqtts) and no client cert.
        username_file, password_file: files whose first line is the broker user name /
            password (so no secret sits in the configuration file).
        device_id: this device's id, 1-64 chars of ``[A-Za-z0-9_.-]``; also its MQTT
            client id and broker user name under the ACL of broker/acl.
        federation: federation id (same alphabet).
        task: the task (docs/tasks.md): ``package.module:attribute``, a built-in name
            (``digits-mlp``, ``mnist-cnn`` ...) or a name registered through the
            ``fedmq.tasks`` entry points.
        data: local training data, read by the task's loader (default: a ``.npz`` file with
            arrays ``x`` and ``y`` or a folder of MNIST IDX files); read again when it changes.
        state_dir: folder of durable state (residual, update in flight, model cache).
        torch_threads: intra-op threads torch may use (>= 1).
        max_train_seconds: cap on local training per round, seconds (> 0); the task's
            own ``max_seconds`` applies too, the smaller wins.
        holdout_fraction: fraction of local samples kept out of training for the local
            held-out loss / accuracy reported with each update, in [0, 0.5).
        seed: seed of local shuffling and of the held-out split.
        keepalive: MQTT keepalive, seconds.
        session_expiry: MQTT 5 session expiry, seconds: how long the broker keeps the
            session (and the tasks / receipts queued for it) while the device is away.
        fetch_timeout: seconds to download one global model version.
        receipt_timeout: seconds without a receipt after which the update in flight is
            published again (same bytes, same transfer id).
        receipt_grace: seconds after the round's deadline to wait for a receipt before the
            update in flight is rolled back into the residual.
        predict_username_file, predict_password_file, predict_tls_cert, predict_tls_key:
            credentials of the device's read-only companion account (``DEVICE.predict``,
            made by ``fedmq broker add-device``) that ``fedmq edge predict`` connects
            with, so that it does not close the running agent's connection (the broker
            binds the client id to the user name). Unset: predict uses the device's own.
        metrics_port: TCP port of the agent's Prometheus endpoint (edge_client.metrics);
            0 (default): none.
        metrics_address: address the endpoint binds (default 127.0.0.1).
        coordinator_key: the coordinator's public key (``seal-key.pub``, written beside the
            device's credentials by ``fedmq broker add-device --coordinator-key``). Set: every
            client update is sealed to it (fedmq.sealing; the broker relays only ciphertext)
            and the device pins it in its state folder, refusing a changed key. Unset
            (default): updates travel as plain envelopes, unless the device pinned a key
            before, which it then refuses to drop.
        model_follow: with a compressed downlink, fetch each new global model version as it
            is published (one small delta each) instead of when a task names it. Off by
            default: catching up when selected never downloads more (the same deltas, or a
            snapshot when that is smaller) and skips versions a device is never asked to use.
        delta_fetch_timeout: seconds to wait for one retained delta blob before falling back
            to the snapshot (a cleared or lost delta never arrives).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    broker_url: str = "mqtt://localhost:1883"
    broker_failover_urls: tuple[str, ...] = ()
    protocol: Literal["5", "3.1.1"] = "5"
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    username_file: Path | None = None
    password_file: Path | None = None
    device_id: str
    federation: str
    task: str
    data: Path
    state_dir: Path
    torch_threads: int = Field(1, ge=1, le=256)
    max_train_seconds: float = Field(300.0, gt=0)
    holdout_fraction: float = Field(0.0, ge=0.0, lt=0.5)
    seed: int = 0
    keepalive: int = Field(30, ge=5, le=3600)
    session_expiry: int = Field(7 * 24 * 3600, ge=0)
    fetch_timeout: float = Field(120.0, gt=0)
    receipt_timeout: float = Field(30.0, gt=0)
    receipt_grace: float = Field(30.0, ge=0)
    predict_username_file: Path | None = None
    predict_password_file: Path | None = None
    predict_tls_cert: Path | None = None
    predict_tls_key: Path | None = None
    metrics_port: int = Field(0, ge=0, le=65535)
    metrics_address: str = "127.0.0.1"
    coordinator_key: Path | None = None
    _source: str = PrivateAttr("edge configuration")

    def where(self, option: str) -> str:
        """``"FILE: option 'NAME'"``: how errors about ``option`` name it."""
        return f"{self._source}: option {option!r}"
    # Compressed downlink (docs/edge-client.md, "Keeping up with the global model").
    model_follow: bool = False
    delta_fetch_timeout: float = Field(10.0, gt=0)

    @field_validator("device_id", "federation")
    @classmethod
    def _id(cls, value: str) -> str:
        try:
            return check_id(value, "id")
        except ConfigError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("broker_url")
    @classmethod
    def _url(cls, value: str) -> str:
        try:
            parse_broker_url(value)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("broker_failover_urls", mode="before")
    @classmethod
    def _failover_urls(cls, value: Any) -> Any:
        # The environment gives one string: URLs separated by commas.
        if isinstance(value, str):
            value = [u for u in (part.strip() for part in value.split(",")) if u]
        if isinstance(value, (list, tuple)):
            for url in value:
                try:
                    parse_broker_url(url)
                except ConfigError as exc:
                    raise ValueError(str(exc)) from None
        return value

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol(cls, value: Any) -> Any:
        # TOML readers write `protocol = 5`; accept the number as well as the string.
        return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def file_name(attr: str) -> str:
    """The name of :class:`EdgeConfig` attribute ``attr`` in the file (``broker.ca_file``)."""
    return _FILE_NAMES.get(attr, attr)


def env_name(option: str) -> str:
    """The environment variable of a file option: ``broker.ca_file`` -> ``FEDMQ_EDGE_BROKER_CA_FILE``."""
    return ENV_PREFIX + option.replace(".", "_").upper()


def _options() -> list[str]:
    return [file_name(attr) for attr in EdgeConfig.model_fields]


def _closest(name: str, candidates: list[str]) -> str:
    # A truncated name ('ca' for 'ca_file') is too short for difflib's ratio.
    match = [c for c in candidates if c.startswith(name)] or difflib.get_close_matches(name, candidates, n=1,
                                                                                       cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else ""


def _deprecated(source: str, old: str, new: str) -> None:
    if (source, old) not in _warned:
        _warned.add((source, old))
        log.warning("%s: %s is deprecated, use %s (the old name keeps working for now)", source, old, new)


def _from_file(raw: dict[str, Any], file: Path) -> dict[str, Any]:
    """The file's options as :class:`EdgeConfig` attributes (tables flattened, old names mapped)."""
    out: dict[str, Any] = {}
    tables = [k for k, v in raw.items() if isinstance(v, dict)]
    for name in tables:
        if name != "broker":
            raise ConfigError(f"{file}: table [{name}] unknown; the only table is [broker]"
                              f"{_closest(name, ['broker'])}")
    for key, value in raw.get("broker", {}).items():
        if key not in BROKER_OPTIONS:
            raise ConfigError(f"{file}: option 'broker.{key}': unknown option{_closest(key, list(BROKER_OPTIONS))} "
                              f"(expected some of {sorted(BROKER_OPTIONS)}; see docs/edge-client.md)")
        out[BROKER_OPTIONS[key]] = value
    for key, value in raw.items():
        if key in tables:
            continue
        if key in DEPRECATED_NAMES:
            attr = DEPRECATED_NAMES[key]
            if attr in out:
                raise ConfigError(f"{file}: option {key!r} and '{file_name(attr)}' both set; keep only "
                                  f"'{file_name(attr)}' ({key!r} is its deprecated name)")
            _deprecated(str(file), f"option {key!r}", f"'{file_name(attr)}' ([broker] table)")
            out[attr] = value
        elif key in EdgeConfig.model_fields:
            out[key] = value
        else:
            raise ConfigError(f"{file}: option {key!r}: unknown option{_closest(key, _options())} "
                              "(see docs/edge-client.md for the list)")
    return out


def _from_env(env: Mapping[str, str], file: Path) -> dict[str, str]:
    """``FEDMQ_EDGE_*`` variables as :class:`EdgeConfig` attributes; unknown ones refused."""
    current = {env_name(file_name(attr)): attr for attr in EdgeConfig.model_fields}
    old = {env_name(name): attr for name, attr in DEPRECATED_NAMES.items()}
    out: dict[str, str] = {}
    for var in sorted(env):
        if not var.startswith(ENV_PREFIX) or var in _NOT_OPTIONS:
            continue
        if var in current:
            out[current[var]] = env[var]
        elif var in old:
            new = env_name(file_name(old[var]))
            if new in env:
                raise ConfigError(f"environment variables {var} and {new} both set; keep only {new} "
                                  f"({var} is its deprecated name)")
            _deprecated("environment", f"variable {var}", new)
            out[old[var]] = env[var]
        else:
            hint = difflib.get_close_matches(var, list(current), n=1, cutoff=0.5)
            closest = f"; did you mean {hint[0]} (option '{file_name(current[hint[0]])}')?" if hint else ""
            raise ConfigError(f"environment variable {var} matches no edge client option{closest} (the "
                              f"options of {file} are listed in docs/edge-client.md)")
    return out


def _default_path(environ: Mapping[str, str]) -> Path:
    conf_dir = environ.get("CONFIGURATION_DIRECTORY")
    if not conf_dir:
        raise ConfigError("no configuration file given: pass -c FILE (or run under systemd, which sets "
                          "$CONFIGURATION_DIRECTORY)")
    # systemd may list several folders separated by ':'; the first is ours.
    return Path(conf_dir.split(":")[0]) / DEFAULT_FILE_NAME


def _describe(errors: list[dict[str, Any]], source: str) -> str:
    lines = []
    for err in errors:
        attr = ".".join(str(p) for p in err["loc"])
        option = file_name(attr) if attr else "(file)"
        env = f" / ${env_name(option)}" if err["loc"] else ""
        if err["type"] == "missing":
            lines.append(f"option {option!r}{env}: required, not set")
        else:
            got = err.get("input")
            lines.append(f"option {option!r}{env}: {err['msg']} (got {got!r})")
    return f"{source}: invalid configuration:\n  " + "\n  ".join(lines)


def _resolve(path: Path | None, base: Path, cred_dir: str | None) -> Path | None:
    if path is None or path.is_absolute():
        return path
    if cred_dir:
        return Path(cred_dir) / path
    return base / path


def load_config(path: str | os.PathLike[str] | None = None,
                environ: Mapping[str, str] | None = None) -> EdgeConfig:
    """Read, override from the environment and validate the edge configuration.

    Args:
        path: TOML file; ``None`` means ``$CONFIGURATION_DIRECTORY/edge.toml``.
        environ: environment to read ``FEDMQ_EDGE_*``, ``CONFIGURATION_DIRECTORY``,
            ``STATE_DIRECTORY`` and ``CREDENTIALS_DIRECTORY`` from (default ``os.environ``).

    A deprecated (fedmq 0.1) option or variable name logs one warning per file and name
    (logger ``edge_client.config``).

    Returns:
        The validated :class:`EdgeConfig`; relative paths resolved (credentials and TLS
        files against ``$CREDENTIALS_DIRECTORY`` when set, else the file's folder;
        ``data`` and ``state_dir`` against the file's folder).

    Raises:
        ConfigError: the file is missing, unreadable or not TOML, an option or a
            ``FEDMQ_EDGE_*`` variable is unknown (the closest option is named), an option
            is set under its old and its new name, missing or out of range, or a
            credential / TLS file does not exist. The message names the file and each bad
            option with what was expected.
    """
    env = os.environ if environ is None else environ
    file = Path(path) if path is not None else _default_path(env)
    overrides = _from_env(env, file)
    raw = _from_file(read_toml(file), file)
    if "state_dir" not in raw and env.get("STATE_DIRECTORY"):
        raw["state_dir"] = env["STATE_DIRECTORY"].split(":")[0]
    raw.update(overrides)
    try:
        cfg = EdgeConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc.errors(), str(file))) from None

    base = file.resolve().parent
    cred_dir = env.get("CREDENTIALS_DIRECTORY")
    updates: dict[str, Any] = {
        "data": cfg.data if cfg.data.is_absolute() else base / cfg.data,
        "state_dir": cfg.state_dir if cfg.state_dir.is_absolute() else base / cfg.state_dir,
    }
    for name in ("tls_ca", "tls_cert", "tls_key", "username_file", "password_file", "predict_username_file",
                 "predict_password_file", "predict_tls_cert", "predict_tls_key", "coordinator_key"):
        resolved = _resolve(getattr(cfg, name), base, cred_dir)
        if resolved is not None and not resolved.is_file():
            raise ConfigError(f"{file}: option {file_name(name)!r}: file {resolved} does not exist "
                              f"(expected a readable file{'; $CREDENTIALS_DIRECTORY=' + cred_dir if cred_dir else ''})")
        updates[name] = resolved
    if (cfg.tls_cert is None) != (cfg.tls_key is None):
        raise ConfigError(f"{file}: options 'broker.cert_file' and 'broker.key_file' go together: set both or "
                          "neither")
    if (cfg.username_file is None) and cfg.password_file is not None:
        raise ConfigError(f"{file}: option 'broker.password_file' needs 'broker.username_file' too")
    if (cfg.predict_tls_cert is None) != (cfg.predict_tls_key is None):
        raise ConfigError(f"{file}: options 'predict_tls_cert' and 'predict_tls_key' go together: set both or neither")
    if (cfg.predict_username_file is None) != (cfg.predict_password_file is None):
        raise ConfigError(f"{file}: options 'predict_username_file' and 'predict_password_file' go together: set "
                          f"both or neither")
    out = cfg.model_copy(update=updates)
    out._source = str(file)
    return out
