"""The ``fedmq`` command line.

Sub-commands come from the ``fedmq.cli`` entry-point group (see pyproject.toml):
``coordinator``, ``edge``, ``broker`` and ``demo``; ``new`` (a project template,
:mod:`fedmq.project`) is the library's own. Discovering the apps at run time keeps the
shared library free of imports of them, and only the sub-command asked for is imported:
``fedmq edge ...`` on a device never imports the coordinator, the broker tools or the
demo (nor what they depend on: matplotlib, scikit-learn, amqtt).
"""

from __future__ import annotations

import sys
from importlib.metadata import entry_points

import typer

from fedmq import __version__


def build_app(only: str | None = None) -> typer.Typer:
    """Assemble the CLI from the installed entry points (only the one named ``only`` when
    it is one of them, so that the others are not imported)."""
    app = typer.Typer(no_args_is_help=True, add_completion=False,
                      help="fedmq: federated learning for fleets of small devices over MQTT.")

    @app.callback(invoke_without_command=True)
    def _root(version: bool = typer.Option(False, "--version", help="Print the version and exit.")) -> None:
        if version:
            typer.echo(__version__)
            raise typer.Exit()

    from fedmq.project import new_command

    app.command("new")(new_command)
    found = sorted(entry_points(group="fedmq.cli"), key=lambda e: e.name)
    if only is not None and any(ep.name == only for ep in found):
        found = [ep for ep in found if ep.name == only]
    for ep in found:
        target = ep.load()
        if isinstance(target, typer.Typer):
            app.add_typer(target, name=ep.name)
        else:
            app.command(ep.name)(target)
    return app


def main() -> None:
    build_app(sys.argv[1] if len(sys.argv) > 1 else None)()


if __name__ == "__main__":
    main()
