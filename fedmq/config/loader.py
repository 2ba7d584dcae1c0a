"""One configuration loader for the coordinator and the edge client: a TOML file, environment
overrides, relative paths, deprecated names and error texts, the same way for both.

An application describes its configuration once, as a pydantic model (every option's type and
default) plus a :class:`ConfigSchema` (environment prefix, which options are paths, its old
names); :meth:`ConfigSchema.load` does the rest.

Sources, later ones winning: defaults the application takes from its surroundings (the edge's
``$STATE_DIRECTORY``), the TOML file, the environment, overrides from Python.

**Environment.** ``<PREFIX>__<OPTION>``, with ``__`` between table levels, in any letter case:
``FEDMQ_COORDINATOR__ROUND__DEADLINE_S=30``, ``FEDMQ_EDGE__BROKER__CA_FILE=ca.crt``. A value for
an option that holds text (a name, a path, a URL) is taken as written (a quoted TOML string,
``"x"``, as the string it spells); a list of text reads as a TOML array or as items separated by
commas; any other value is read as a TOML value (``20``, ``0.5``, ``true``, ``[1, 2]``), and as
text when it is not one. A variable with the prefix that names no option is an error naming the
closest variable. Old names of an option (an application's earlier file keys and variables)
still read, each with one warning naming the new name; the old and the new name together are
an error.

**Paths.** A relative path written in the file is relative to the file's folder; one from the
environment or from Python, to the working folder. A credential or TLS file (the ``[broker]``
files and the edge's ``predict_*`` / ``coordinator_key``) given by a relative path is looked up in
``$CREDENTIALS_DIRECTORY`` when that is set (systemd ``LoadCredential=``), and must exist.

**Errors.** Every problem is a :class:`fedmq.errors.ConfigError` naming the source (file and
overriding variables), each bad option, what was expected, the value given and, for a value
from the environment, its variable; an unknown option names the closest known one.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import tomllib
import types
import typing
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path, PurePath
from typing import Any, Literal, Union

from pydantic import BaseModel, PrivateAttr, ValidationError

from fedmq.errors import ConfigError
from fedmq.config.settings_file import read_toml
from fedmq.transport.settings import BrokerSettings, parse_broker_url

log = logging.getLogger(__name__)

#: The default of an option that has none.
REQUIRED = "required"
#: ``(source, old name)`` pairs already warned about: one warning per file (or environment) and name.
_warned: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class Option:
    """One option of a configuration.

    Attributes:
        name: dotted as in the file (``broker.ca_file``; a table's alias, ``async``, not the
            Python attribute ``async_``).
        default: the value an unset option takes (:data:`REQUIRED` when it must be set).
        text: the option holds text (str, path, a choice of strings): environment values are
            taken as written.
        listing: the option holds a list of text: environment values may be comma-separated.
        table: the option is a free-form table (a ``dict`` field): any key under it is accepted.
    """

    name: str
    default: Any
    text: bool = False
    listing: bool = False
    table: bool = False


def _members(kind: Any) -> list[Any]:
    return [a for a in typing.get_args(kind) if a is not type(None) and a is not Ellipsis]


def _is_text(kind: Any) -> bool:
    origin = typing.get_origin(kind)
    if origin in (Union, types.UnionType):
        return bool(_members(kind)) and all(_is_text(a) for a in _members(kind))
    if origin is Literal:
        return all(isinstance(a, str) for a in typing.get_args(kind))
    return kind is str or (isinstance(kind, type) and issubclass(kind, PurePath))


def _is_text_list(kind: Any) -> bool:
    if typing.get_origin(kind) in (Union, types.UnionType):
        return any(_is_text_list(a) for a in _members(kind))
    return typing.get_origin(kind) in (tuple, list) and bool(_members(kind)) and all(_is_text(a) for a in
                                                                                  _members(kind))


def _fields(kind: Any) -> list[tuple[str, str, Any, Any]] | None:
    """``(file name, attribute, annotation, default)`` of a model or dataclass; None for other types."""
    if isinstance(kind, type) and issubclass(kind, BaseModel):
        return [(f.alias or name, name, f.annotation,
                 REQUIRED if f.is_required() else f.get_default(call_default_factory=True))
                for name, f in kind.model_fields.items()]
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        hints = typing.get_type_hints(kind)
        out = []
        for f in dataclasses.fields(kind):
            if not f.init:
                continue
            default = (f.default if f.default is not dataclasses.MISSING else
                       f.default_factory() if f.default_factory is not dataclasses.MISSING else REQUIRED)
            out.append((f.name, f.name, hints[f.name], default))
        return out
    return None


def _table_default(table: Any, key: str) -> Any:
    """The default of ``key`` in a table that holds a codec's parameters flat: its own field,
    the codec's name for ``codec``, or the codec's parameter (None for another codec's)."""
    if table is None:
        return None
    codec = getattr(table, "codec", None)
    if key == "codec" and codec is not None:
        return getattr(codec, "name", codec)
    if hasattr(table, key):
        return getattr(table, key)
    return getattr(getattr(codec, "params", None), key, None)


def options_of(model: type) -> dict[str, Option]:
    """Every option of ``model`` (a pydantic model or dataclass, tables nested), by dotted name.

    A table's options take their defaults from the table's default value, so an application
    whose ``[broker]`` default differs from :class:`BrokerSettings`'s (the edge's session
    expiry) reports its own.
    """
    out: dict[str, Option] = {}

    def walk(kind: Any, prefix: str, instance: Any) -> None:
        for key, attr, annotation, default in _fields(kind) or []:
            if instance is not None:
                default = getattr(instance, attr)
            name = prefix + key
            if hasattr(annotation, "option_names"):
                # A table whose keys are its fields and a codec's parameters, flat ([plan],
                # [downlink]: fedmq.codecs.CodecSpec): the codec's name is text.
                table = None if default is REQUIRED else default
                for sub in annotation.option_names():
                    value = _table_default(table, sub)
                    out[f"{name}.{sub}"] = Option(f"{name}.{sub}", value,
                                                  text=sub == "codec" or isinstance(value, str))
            elif _fields(annotation) is not None:
                walk(annotation, name + ".", None if default is REQUIRED else default)
            elif typing.get_origin(annotation) is dict or annotation is dict:
                out[name] = Option(name, default, table=True)
            else:
                out[name] = Option(name, default, text=_is_text(annotation), listing=_is_text_list(annotation))

    walk(model, "", None)
    return out


def closest(name: str, candidates: list[str]) -> str | None:
    """The candidate ``name`` was most likely meant to be (a truncated name counts), or None."""
    # A truncated name ('ca' for 'ca_file') is too short for difflib's ratio.
    starts = [c for c in candidates if c.startswith(name)]
    return (starts or difflib.get_close_matches(name, candidates, n=1, cutoff=0.5) or [None])[0]


def _hint(name: str, candidates: list[str]) -> str:
    match = closest(name, candidates)
    return f"; did you mean {match!r}?" if match else ""


def env_value(text: str, option: Option) -> Any:
    """The value of an environment variable for ``option`` (see the module's rules)."""
    try:
        value, parsed = tomllib.loads(f"v = {text}")["v"], True
    except tomllib.TOMLDecodeError:
        value, parsed = text, False
    if option.text:
        return value if isinstance(value, str) else text
    if option.listing and not isinstance(value, list):
        return [item for item in (part.strip() for part in text.split(",")) if item]
    return value if parsed else text


def merge(into: dict[str, Any], extra: Mapping[str, Any]) -> None:
    """Merge the nested mapping ``extra`` into ``into``, tables key by key."""
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = dict(value) if isinstance(value, Mapping) else value


def _get(data: Mapping[str, Any], option: str) -> Any:
    node: Any = data
    for part in option.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _set(data: dict[str, Any], option: str, value: Any, where: str) -> None:
    node = data
    parts = option.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: option {part!r} is not a table")
        node = child
    node[parts[-1]] = value


def _pop(data: dict[str, Any], option: str) -> tuple[bool, Any]:
    *parents, last = option.split(".")
    node: Any = data
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict) and last in node:
        return True, node.pop(last)
    return False, None


def fold_renamed(data: dict[str, Any], renamed: Mapping[str, str], where: str,
                 warn: Callable[[str, str], None]) -> None:
    """Move options given under an old name (``renamed``: old dotted name -> new) to the new one.

    Raises:
        ConfigError: both the old and the new name are set (names both).
    """
    for old, new in renamed.items():
        found, value = _pop(data, old)
        if not found:
            continue
        if _get(data, new) is not None:
            raise ConfigError(f"{where}: option {old!r} and {new!r} both set; keep only {new!r} ({old!r} is its "
                              "deprecated name)")
        warn(old, new)
        _set(data, new, value, where)


def warn_once(source: str, old: str, new: str) -> None:
    """Log that ``old`` (an option or variable, read from ``source``) is deprecated for ``new``,
    once per source and name."""
    if (source, old) not in _warned:
        _warned.add((source, old))
        log.warning("%s: %s is deprecated, use %s (the old name keeps working for now)", source, old, new)


def warn_python(old: str, new: str) -> None:
    """A deprecated keyword given from Python: a :class:`DeprecationWarning` naming the new one."""
    warnings.warn(f"configuration option {old!r} is deprecated, use {new!r}", DeprecationWarning, stacklevel=4)


def broker_table(value: Any, default: BrokerSettings) -> Any:
    """The ``[broker]`` table as :class:`BrokerSettings`, its unset options taken from ``default``
    (the application's defaults); anything else is returned as is for pydantic to judge.

    The one shape of broker settings for both applications: same names, same checks.

    Raises:
        ConfigError: an unknown option (the closest is named), an invalid value, or a
            ``password_file`` without a ``username`` / ``username_file``.
    """
    if not isinstance(value, Mapping):
        return value
    names = [f.name for f in dataclasses.fields(BrokerSettings)]
    for key in value:
        if key not in names:
            raise ConfigError(f"unknown option 'broker.{key}'{_hint(key, names)} (expected some of {sorted(names)})")
    for key in ("url", "failover_urls", "retain_urls"):
        urls = value.get(key)
        for url in urls if isinstance(urls, (list, tuple)) else [] if urls is None else [urls]:
            try:
                parse_broker_url(url)
            except ConfigError as exc:
                raise ConfigError(f"option 'broker.{key}': {exc}") from None
    table = {f.name: getattr(default, f.name) for f in dataclasses.fields(BrokerSettings)
             if getattr(default, f.name) != f.default}
    table.update({k: str(v) if isinstance(v, PurePath) else v for k, v in value.items()})
    try:
        settings = BrokerSettings.from_mapping(table, "broker")
    except ConfigError as exc:
        raise ConfigError(str(exc).removeprefix("broker: ")) from None
    if settings.password_file is not None and settings.username is None and settings.username_file is None:
        raise ConfigError("option 'broker.password_file' needs 'broker.username_file' (or 'broker.username') too")
    return settings


class Sourced(BaseModel):
    """A configuration that knows where it was read from, so that later errors can say so."""

    _source: str = PrivateAttr("configuration")

    def where(self, option: str) -> str:
        """``"SOURCE: option 'NAME'"``: how errors about ``option`` name it."""
        return f"{self._source}: option {option!r}"


@dataclass(frozen=True)
class ConfigSchema:
    """How one application's configuration is read.

    Attributes:
        app: the application's name in messages (``coordinator``, ``edge client``).
        model: the pydantic model holding every option and its default (a :class:`Sourced`).
        env_prefix: ``FEDMQ_COORDINATOR``: variables are ``FEDMQ_COORDINATOR__<OPTION>``.
        reference: the document listing every option.
        paths: options holding a path (resolved as the module says).
        credentials: options holding a credential or TLS file (looked up in
            ``$CREDENTIALS_DIRECTORY``, and checked to exist).
        keywords: values of a path option that are words, not paths (``evaluation.data = "task"``).
        renamed: old option name (dotted) -> new, still read from files and from Python.
        old_variables: old environment variable (upper case) -> option, still read.
        old_prefix: the prefix of the old variables (``FEDMQ_EDGE_``): another variable with it
            that is no old name is refused as a typo, not ignored.
        not_options: variables with a prefix above that are not options (test hooks).
    """

    app: str
    model: type[Sourced]
    env_prefix: str
    reference: str
    paths: tuple[str, ...] = ()
    credentials: tuple[str, ...] = ()
    keywords: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    renamed: Mapping[str, str] = field(default_factory=dict)
    old_variables: Mapping[str, str] = field(default_factory=dict)
    old_prefix: str | None = None
    not_options: tuple[str, ...] = ()

    @cached_property
    def options(self) -> dict[str, Option]:
        """Every option by dotted name, with its default (:func:`options_of` on the model)."""
        return options_of(self.model)

    def env_name(self, option: str) -> str:
        """``round.deadline_s`` -> ``FEDMQ_COORDINATOR__ROUND__DEADLINE_S``."""
        return f"{self.env_prefix}__{option.replace('.', '__').upper()}"

    def option(self, name: str) -> Option | None:
        """The option called ``name`` (one under a free-form table: that table's), or None."""
        if name in self.options:
            return self.options[name]
        parts = name.split(".")
        for i in range(len(parts) - 1, 0, -1):
            table = self.options.get(".".join(parts[:i]))
            if table is not None and table.table:
                return Option(name, REQUIRED)
        return None

    # -- sources --------------------------------------------------------------------------

    def read_file(self, path: Path, environ: Mapping[str, str]) -> dict[str, Any]:
        """The file's options (old names moved to the new, paths resolved against its folder).

        Raises:
            ConfigError: missing, unreadable or not TOML; an option under both names.
        """
        data = read_toml(path)
        fold_renamed(data, self.renamed, str(path), lambda old, new: warn_once(str(path), f"option {old!r}",
                                                                               repr(new)))
        self._resolve(data, path.resolve().parent, environ.get("CREDENTIALS_DIRECTORY"))
        return data

    def read_environment(self, environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
        """The options set by the environment, nested, and ``{option: variable}`` for messages.

        Raises:
            ConfigError: a variable names no option (the closest is named), has an empty level,
                or an option is set under its old and its new variable.
        """
        upper = {var.upper(): var for var in environ}
        new_prefix = self.env_prefix + "__"
        data: dict[str, Any] = {}
        origins: dict[str, str] = {}
        for key in sorted(upper):
            var = upper[key]
            if key.startswith(new_prefix):
                option = key[len(new_prefix):].lower().replace("__", ".")
                if not all(option.split(".")):
                    raise ConfigError(f"environment variable {var}: empty option level; expected "
                                      f"{new_prefix}<OPTION>[__<OPTION>...]")
                spec = self.option(option)
                if spec is None:
                    raise self._unknown_variable(var)
            elif key in self.old_variables:
                option = self.old_variables[key]
                spec = self.options[option]
                if self.env_name(option) in upper:
                    raise ConfigError(f"environment variables {var} and {upper[self.env_name(option)]} both set; "
                                      f"keep only {self.env_name(option)} ({var} is its deprecated name)")
                warn_once("environment", f"variable {var}", self.env_name(option))
            elif self.old_prefix and key.startswith(self.old_prefix) and key not in self.not_options:
                raise self._unknown_variable(var)
            else:
                continue
            _set(data, option, env_value(environ[var], spec), f"environment variable {var}")
            origins[option] = var
        self._resolve(data, None, environ.get("CREDENTIALS_DIRECTORY"))
        return data, origins

    def _unknown_variable(self, var: str) -> ConfigError:
        names = {self.env_name(o): o for o in self.options}
        match = closest(var.upper(), list(names))
        hint = f"; did you mean {match} (option {names[match]!r})?" if match else ""
        return ConfigError(f"environment variable {var} matches no {self.app} option{hint} (the options are "
                           f"listed in {self.reference})")

    def _resolve(self, data: dict[str, Any], base: Path | None, credentials_dir: str | None) -> None:
        for option in self.paths + self.credentials:
            value = _get(data, option)
            if not isinstance(value, (str, PurePath)) or str(value) in self.keywords.get(option, ()) or not str(value):
                continue
            path = Path(value)
            if path.is_absolute():
                continue
            if option in self.credentials and credentials_dir:
                path = Path(credentials_dir) / path
            elif base is not None:
                path = base / path
            _set(data, option, str(path), option)

    def _check_credentials(self, data: Mapping[str, Any], source: str) -> None:
        for option in self.credentials:
            value = _get(data, option)
            if isinstance(value, (str, PurePath)) and not Path(value).is_file():
                raise ConfigError(f"{source}: option {option!r}: file {value} does not exist (expected a readable "
                                  "file; a relative name is looked up in $CREDENTIALS_DIRECTORY when that is set)")

    # -- the whole --------------------------------------------------------------------------

    def load(self, path: str | os.PathLike[str] | None, environ: Mapping[str, str] | None = None,
             overrides: Mapping[str, Any] | None = None, defaults: Mapping[str, Any] | None = None) -> Any:
        """Read the file at ``path`` (None: none), the environment and ``overrides``; validate.

        Args:
            path: TOML file, or None to build the configuration from the other sources.
            environ: the environment (default ``os.environ``).
            overrides: a nested mapping merged last (the Python API, tests).
            defaults: a nested mapping under the file (values the application takes from
                its surroundings, e.g. ``$STATE_DIRECTORY``).

        Returns:
            The validated model, its ``where()`` naming the file and the overriding variables.

        Raises:
            ConfigError: see the module docstring.
        """
        env = os.environ if environ is None else environ
        data: dict[str, Any] = {}
        merge(data, defaults or {})
        source = "no file"
        if path is not None:
            source = str(path)
            merge(data, self.read_file(Path(path), env))
        from_env, origins = self.read_environment(env)
        merge(data, from_env)
        if origins:
            source += " + environment overrides " + ", ".join(origins)
        merge(data, overrides or {})
        self._check_credentials(data, source)
        return self.validate(data, source, origins)

    def validate(self, data: Mapping[str, Any], source: str, origins: Mapping[str, str] | None = None) -> Any:
        """Validate a mapping already merged from its sources.

        Raises:
            ConfigError: listing every invalid option with what was expected.
        """
        try:
            cfg = self.model.model_validate(dict(data))
        except ValidationError as exc:
            raise ConfigError(self.describe(exc, source, origins or {})) from None
        cfg._source = source
        return cfg

    def describe(self, exc: ValidationError, source: str, origins: Mapping[str, str]) -> str:
        """One line per invalid option: ``option: what was expected (got value, from $VAR)``."""
        lines = [f"{source}: invalid {self.app} configuration:"]
        for err in exc.errors():
            loc = [str(p) for p in err["loc"]]
            option = ".".join(loc) or "(top level)"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                siblings = [name.split(".")[len(loc) - 1] for name in self.options
                            if name.split(".")[:len(loc) - 1] == loc[:-1] and name.count(".") >= len(loc) - 1]
                msg = "unknown option" + _hint(loc[-1], sorted(set(siblings)))
            elif err["type"] == "missing":
                msg = "required option is missing"
            detail = []
            got = err.get("input")
            if err["type"] != "missing" and not isinstance(got, dict):
                detail.append(f"got {got!r}")
            if option in origins:
                detail.append(f"from ${origins[option]}")
            lines.append(f"  {option}: {msg}" + (f" ({', '.join(detail)})" if detail else ""))
        return "\n".join(lines)
