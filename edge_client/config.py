"""Edge client configuration: the options, their defaults and their checks, read by the shared
loader (:mod:`fedmq.config.loader`): one TOML file, every option overridable from the environment.

The file has top-level options (``device_id``, ``task``, ...) and one table, ``[broker]``, the
coordinator's (:class:`fedmq.transport.BrokerSettings`: ``url``, ``protocol``,
``username_file``, ``password_file``, ``ca_file``, ``cert_file``, ``key_file``, ``keepalive``,
``session_expiry``, ``failover_urls``, ...), whose only default of the device's own is a
persistent session (:data:`DEVICE_SESSION_EXPIRY_S`).

Environment: ``FEDMQ_EDGE__<OPTION>``, ``__`` between table levels (``FEDMQ_EDGE__DEVICE_ID``,
``FEDMQ_EDGE__BROKER__CA_FILE``), values read as :mod:`fedmq.config.loader` says. A
``FEDMQ_EDGE_*`` / ``FEDMQ_EDGE__*`` variable that names no option is an error naming the
closest one. Old names still read, each with one deprecation warning naming the new one:

* the earlier one-underscore variables (``FEDMQ_EDGE_DEVICE_ID``, ``FEDMQ_EDGE_BROKER_CA_FILE``),
  fedmq 0.1's flat ones among them (``FEDMQ_EDGE_TLS_CA``);
* fedmq 0.1's flat top-level file options (``broker_url``, ``tls_ca``, ``tls_cert``,
  ``tls_key``, top-level ``username_file``, ...), also as keyword arguments of
  :class:`EdgeConfig` (a :class:`DeprecationWarning` there).

Under systemd (deploy/fedmq-edge.service):

* the default file is ``$CONFIGURATION_DIRECTORY/edge.toml``;
* ``state_dir`` defaults to ``$STATE_DIRECTORY``;
* a relative credential or TLS file (``[broker]`` files, ``predict_*``, ``coordinator_key``) is
  looked up in ``$CREDENTIALS_DIRECTORY`` (filled by ``LoadCredential=``) when that is set,
  else relative to the configuration file's folder.

Options, types, defaults and units are in docs/edge-client.md. Every problem raises
:class:`fedmq.errors.ConfigError` naming the file, the option and what was expected.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, Field, field_validator, model_validator

from fedmq.config.loader import ConfigSchema, Sourced, broker_table, fold_renamed, options_of, warn_python
from fedmq.errors import ConfigError
from fedmq.testhooks import hook_variables
from fedmq.wire.topics import check_id
from fedmq.transport.settings import BrokerSettings

DEFAULT_FILE_NAME = "edge.toml"
#: MQTT 5 session expiry of a device, seconds (7 days): the broker keeps its session, and the
#: tasks and receipts queued for it, while the device is away. The coordinator's is its own
#: (docs/coordinator.md, ``[broker] session_expiry``).
DEVICE_SESSION_EXPIRY_S = 7 * 24 * 3600
#: A device's ``[broker]`` defaults: :class:`BrokerSettings`'s, with a persistent session.
DEVICE_BROKER = BrokerSettings(session_expiry=DEVICE_SESSION_EXPIRY_S)

#: fedmq 0.1's flat names of the ``[broker]`` options (file keys, keyword arguments) -> option.
RENAMED = {"broker_url": "broker.url", "protocol": "broker.protocol", "tls_ca": "broker.ca_file",
           "tls_cert": "broker.cert_file", "tls_key": "broker.key_file", "username_file": "broker.username_file",
           "password_file": "broker.password_file", "keepalive": "broker.keepalive",
           "session_expiry": "broker.session_expiry", "broker_failover_urls": "broker.failover_urls"}


class EdgeConfig(Sourced):
    """Validated edge client settings (see docs/edge-client.md for the reference table).

    Attributes:
        broker: how to reach the broker (:class:`fedmq.transport.BrokerSettings`, the
            ``[broker]`` table; defaults :data:`DEVICE_BROKER`). ``failover_urls``: the other
            nodes of a broker cluster, same scheme (environment: URLs separated by commas).
            ``protocol`` ``"5"`` gives the persistent session, ``"3.1.1"`` a clean one.
            ``username_file`` / ``password_file``: files whose first line is the broker user
            name / password (so no secret sits in the configuration file).
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
            client update is sealed to it (fedmq.security.sealing; the broker relays only ciphertext)
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

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    broker: BrokerSettings = DEVICE_BROKER
    device_id: str
    federation: str
    task: str
    data: Path
    state_dir: Path
    torch_threads: int = Field(1, ge=1, le=256)
    max_train_seconds: float = Field(300.0, gt=0)
    holdout_fraction: float = Field(0.0, ge=0.0, lt=0.5)
    seed: int = 0
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
    # Compressed downlink (docs/edge-client.md, "Keeping up with the global model").
    model_follow: bool = False
    delta_fetch_timeout: float = Field(10.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _flat_broker_names(cls, data: Any) -> Any:
        # EdgeConfig(broker_url=..., tls_ca=...) from Python callers written for fedmq 0.1.
        if isinstance(data, Mapping) and any(name in data for name in RENAMED):
            data = dict(data)
            if isinstance(data.get("broker"), BrokerSettings):
                raise ValueError("give the broker settings either as broker=BrokerSettings(...) or by their "
                                 f"deprecated flat names ({sorted(set(RENAMED) & set(data))}), not both")
            try:
                fold_renamed(data, RENAMED, "EdgeConfig", warn_python)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return data

    @field_validator("broker", mode="before")
    @classmethod
    def _broker_table(cls, value: Any) -> Any:
        try:
            return broker_table(value, DEVICE_BROKER)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("device_id", "federation")
    @classmethod
    def _id(cls, value: str) -> str:
        try:
            return check_id(value, "id")
        except ConfigError as exc:
            raise ValueError(str(exc)) from None

    @model_validator(mode="after")
    def _pairs(self) -> EdgeConfig:
        if (self.predict_tls_cert is None) != (self.predict_tls_key is None):
            raise ValueError("options 'predict_tls_cert' and 'predict_tls_key' go together: set both or neither")
        if (self.predict_username_file is None) != (self.predict_password_file is None):
            raise ValueError("options 'predict_username_file' and 'predict_password_file' go together: set both "
                             "or neither")
        return self


def _old_variables() -> dict[str, str]:
    # Before the shared loader every option was FEDMQ_EDGE_<OPTION>, a [broker] one
    # FEDMQ_EDGE_BROKER_<OPTION>, and fedmq 0.1's flat names (FEDMQ_EDGE_TLS_CA) were read too.
    names = {"FEDMQ_EDGE_" + option.replace(".", "_").upper(): option for option in options_of(EdgeConfig)}
    names.update({"FEDMQ_EDGE_" + old.upper(): new for old, new in RENAMED.items()})
    return names


SCHEMA = ConfigSchema(
    app="edge client", model=EdgeConfig, env_prefix="FEDMQ_EDGE", reference="docs/edge-client.md",
    paths=("data", "state_dir"),
    credentials=("broker.username_file", "broker.password_file", "broker.ca_file", "broker.cert_file",
                 "broker.key_file", "predict_username_file", "predict_password_file", "predict_tls_cert",
                 "predict_tls_key", "coordinator_key"),
    renamed=RENAMED, old_variables=_old_variables(), old_prefix="FEDMQ_EDGE_",
    # The agent's test hook (edge_client.agent) reads these.
    not_options=hook_variables("FEDMQ_EDGE"))


def _default_path(environ: Mapping[str, str]) -> Path:
    conf_dir = environ.get("CONFIGURATION_DIRECTORY")
    if not conf_dir:
        raise ConfigError("no configuration file given: pass -c FILE (or run under systemd, which sets "
                          "$CONFIGURATION_DIRECTORY)")
    # systemd may list several folders separated by ':'; the first is ours.
    return Path(conf_dir.split(":")[0]) / DEFAULT_FILE_NAME


def load_config(path: str | os.PathLike[str] | None = None,
                environ: Mapping[str, str] | None = None) -> EdgeConfig:
    """Read, override from the environment and validate the edge configuration.

    Args:
        path: TOML file; ``None`` means ``$CONFIGURATION_DIRECTORY/edge.toml``.
        environ: environment to read ``FEDMQ_EDGE__*`` (and the old names),
            ``CONFIGURATION_DIRECTORY``, ``STATE_DIRECTORY`` and ``CREDENTIALS_DIRECTORY``
            from (default ``os.environ``).

    A deprecated option or variable name logs one warning per file and name (logger
    ``fedmq.config.loader``).

    Returns:
        The validated :class:`EdgeConfig`; relative paths resolved (credential and TLS
        files against ``$CREDENTIALS_DIRECTORY`` when set, else the file's folder; ``data``
        and ``state_dir`` against the file's folder; values from the environment against
        the working folder).

    Raises:
        ConfigError: the file is missing, unreadable or not TOML, an option or a
            ``FEDMQ_EDGE_*`` variable is unknown (the closest option is named), an option
            is set under its old and its new name, missing or out of range, or a
            credential / TLS file does not exist. The message names the file and each bad
            option with what was expected.
    """
    env = os.environ if environ is None else environ
    file = Path(path) if path is not None else _default_path(env)
    state = env.get("STATE_DIRECTORY")
    cfg: EdgeConfig = SCHEMA.load(file, env, defaults={"state_dir": state.split(":")[0]} if state else None)
    return cfg
