"""Edge client configuration: one TOML file, every option overridable from the environment.

The file is flat TOML (``key = value``, no tables). Each option ``name`` can be overridden
by the environment variable ``FEDMQ_EDGE_<NAME>`` (upper case), e.g. ``FEDMQ_EDGE_DEVICE_ID``;
environment values are strings, converted and validated like file values. Options, types,
defaults and units are documented in docs/edge-client.md and on :class:`EdgeConfig`.

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

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fedmq.errors import ConfigError
from fedmq.settings_file import read_toml
from fedmq.topics import check_id
from fedmq.transport.settings import parse_broker_url

ENV_PREFIX = "FEDMQ_EDGE_"
DEFAULT_FILE_NAME = "edge.toml"


class EdgeConfig(BaseModel):
    """Validated edge client settings (see docs/edge-client.md for the reference table).

    Attributes:
        broker_url: ``mqtt://host[:port]`` or ``mqtts://host[:port]`` (TLS), default port
            1883 / 8883.
        protocol: MQTT protocol version, ``"5"`` (persistent session with expiry; default)
            or ``"3.1.1"`` (clean_session=False).
        tls_ca, tls_cert, tls_key: PEM files: CA bundle to verify the broker; client
            certificate and key for mutual TLS. Unset: system CAs (mqtts) and no client cert.
        username_file, password_file: files whose first line is the broker user name /
            password (so no secret sits in the configuration file).
        device_id: this device's id, 1-64 chars of ``[A-Za-z0-9_.-]``; also its MQTT
            client id and broker user name under the ACL of broker/acl.
        federation: federation id (same alphabet).
        task: task name from the fedmq task registry (e.g. ``digits-mlp``, ``mnist-cnn``).
        data: local training data: a ``.npz`` file with arrays ``x`` and ``y`` or a folder
            of MNIST IDX files.
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
        model_follow: with a compressed downlink, fetch each new global model version as it
            is published (one small delta each) instead of when a task names it. Off by
            default: catching up when selected never downloads more (the same deltas, or a
            snapshot when that is smaller) and skips versions a device is never asked to use.
        delta_fetch_timeout: seconds to wait for one retained delta blob before falling back
            to the snapshot (a cleared or lost delta never arrives).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    broker_url: str = "mqtt://localhost:1883"
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
    holdout_fraction: float = Field(0.1, ge=0.0, lt=0.5)
    seed: int = 0
    keepalive: int = Field(30, ge=5, le=3600)
    session_expiry: int = Field(7 * 24 * 3600, ge=0)
    fetch_timeout: float = Field(120.0, gt=0)
    receipt_timeout: float = Field(30.0, gt=0)
    receipt_grace: float = Field(30.0, ge=0)
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

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol(cls, value: Any) -> Any:
        # TOML readers write `protocol = 5`; accept the number as well as the string.
        return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


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
        option = ".".join(str(p) for p in err["loc"]) or "(file)"
        env = f" / ${ENV_PREFIX}{option.upper()}" if err["loc"] else ""
        if err["type"] == "missing":
            lines.append(f"option {option!r}{env}: required, not set")
        elif err["type"] == "extra_forbidden":
            lines.append(f"option {option!r}: unknown option (see docs/edge-client.md for the list)")
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

    Returns:
        The validated :class:`EdgeConfig`; relative paths resolved (credentials and TLS
        files against ``$CREDENTIALS_DIRECTORY`` when set, else the file's folder;
        ``data`` and ``state_dir`` against the file's folder).

    Raises:
        ConfigError: the file is missing, unreadable or not TOML, an option is unknown,
            missing or out of range, or a credential / TLS file does not exist. The
            message names the file and each bad option with what was expected.
    """
    env = os.environ if environ is None else environ
    file = Path(path) if path is not None else _default_path(env)
    raw = read_toml(file)
    nested = [k for k, v in raw.items() if isinstance(v, dict)]
    if nested:
        raise ConfigError(f"{file}: option(s) {nested} are tables; expected flat 'key = value' options")
    if "state_dir" not in raw and env.get("STATE_DIRECTORY"):
        raw["state_dir"] = env["STATE_DIRECTORY"].split(":")[0]
    for name in EdgeConfig.model_fields:
        value = env.get(ENV_PREFIX + name.upper())
        if value is not None:
            raw[name] = value
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
    for name in ("tls_ca", "tls_cert", "tls_key", "username_file", "password_file"):
        resolved = _resolve(getattr(cfg, name), base, cred_dir)
        if resolved is not None and not resolved.is_file():
            raise ConfigError(f"{file}: option {name!r}: file {resolved} does not exist "
                              f"(expected a readable file{'; $CREDENTIALS_DIRECTORY=' + cred_dir if cred_dir else ''})")
        updates[name] = resolved
    if (cfg.tls_cert is None) != (cfg.tls_key is None):
        raise ConfigError(f"{file}: options 'tls_cert' and 'tls_key' go together: set both or neither")
    if (cfg.username_file is None) and cfg.password_file is not None:
        raise ConfigError(f"{file}: option 'password_file' needs 'username_file' too")
    return cfg.model_copy(update=updates)
