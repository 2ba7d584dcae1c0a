"""The ``fedmq`` command line.

Sub-commands come from the ``fedmq.cli`` entry-point group (see pyproject.toml):
``coordinator``, ``edge``, ``broker`` and ``demo``. Discovering them at run time keeps
the shared library free of imports of the apps.
"""

from __future__ import annotations

from importlib.metadata import entry_points

import typer

from fedmq import __version__


def build_app() -> typer.Typer:
    """Assemble the CLI from the installed entry points."""
    app = typer.Typer(no_args_is_help=True, add_completion=False,
                      help="fedmq: federated learning for fleets of small devices over MQTT.")

    @app.callback(invoke_without_command=True)
    def _root(version: bool = typer.Option(False, "--version", help="Print the version and exit.")) -> None:
        if version:
            typer.echo(__version__)
            raise typer.Exit()

    for ep in sorted(entry_points(group="fedmq.cli"), key=lambda e: e.name):
        target = ep.load()
        if isinstance(target, typer.Typer):
            app.add_typer(target, name=ep.name)
        else:
            app.command(ep.name)(target)
    return app


def main() -> None:
    build_app()()


if __name__ == "__main__":
    main()
