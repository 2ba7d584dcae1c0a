"""``fedmq new NAME``: a ready project, like ``flwr new``.

Writes the folder ``NAME/`` (a Python package) holding:

* ``__init__.py`` and ``task.py``: the task module (:class:`fedmq.tasks.Task`, a regression
  example on a CSV sensor log, with reference data so that ``fedmq demo`` runs it);
* ``coordinator.toml`` and ``edge.toml``: configurations that name the task as
  ``NAME.task:task``;
* ``README.md``: the three commands that run it (the embedded broker, mosquitto, a device).

An existing non-empty folder is refused (nothing is overwritten); exit code 2.
"""

from __future__ import annotations

import keyword
from importlib.resources import files
from pathlib import Path

import typer

from fedmq.storage.atomic import atomic_write_text
from fedmq.errors import ConfigError

#: Template file -> file written into the project folder.
TEMPLATES = {"task.py.tmpl": "task.py", "README.md.tmpl": "README.md", "coordinator.toml.tmpl": "coordinator.toml",
             "edge.toml.tmpl": "edge.toml"}


def new_project(name: str, parent: Path = Path(".")) -> Path:
    """Write the project ``parent/name`` and return its folder.

    Raises:
        ConfigError: ``name`` is not a Python identifier usable as a package and federation
            id, or ``parent/name`` exists and is not an empty folder.
    """
    if not name.isidentifier() or keyword.iskeyword(name) or len(name) > 64:
        raise ConfigError(f"project name {name!r}: expected a Python identifier (letters, digits, '_'; "
                          "not starting with a digit), at most 64 characters")
    folder = Path(parent) / name
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ConfigError(f"{folder}: exists and is not an empty folder; choose another name or folder")
    folder.mkdir(parents=True, exist_ok=True)
    source = files("fedmq") / "templates"
    atomic_write_text(folder / "__init__.py", f'"""{name}: a fedmq project (see README.md)."""\n')
    for template, target in TEMPLATES.items():
        atomic_write_text(folder / target, source.joinpath(template).read_text(encoding="utf-8").format(name=name))
    return folder


def new_command(name: str = typer.Argument(..., help="Project (and Python package) name."),
                directory: Path = typer.Option(Path("."), "--dir", help="Folder to create the project in.")) -> None:
    """Write a ready project: a task module, coordinator and edge configs, a README."""
    try:
        folder = new_project(name, directory)
    except ConfigError as exc:
        typer.echo(f"fedmq new: error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {folder}/: task.py, coordinator.toml, edge.toml, README.md\n"
               f"next: fedmq demo --task {name}.task:task --devices 3 --per-round 3 --rounds 5")
