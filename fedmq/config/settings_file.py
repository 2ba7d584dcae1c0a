"""Reading configuration files, shared by the coordinator and the edge client."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from fedmq.errors import ConfigError


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The TOML document at ``path`` as a dict (UTF-8).

    Raises:
        ConfigError: the file is missing, unreadable or not valid TOML (names the path,
            and the line and column for a syntax error).
    """
    file = Path(path)
    try:
        return tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{file}: configuration file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file}: cannot read configuration file ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: not valid TOML ({exc})") from None
