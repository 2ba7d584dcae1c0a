"""The ``fedmq`` command line, and what every fedmq command shares.

Sub-commands come from the ``fedmq.cli`` entry-point group (see pyproject.toml):
``coordinator``, ``edge``, ``broker`` and ``demo``; ``new`` (a project template,
:mod:`fedmq.project`) is the library's own. Discovering the apps at run time keeps the
shared library free of imports of them, and only the sub-command asked for is imported:
``fedmq edge ...`` on a device never imports the coordinator, the broker tools or the
demo (nor what they depend on: matplotlib, scikit-learn, amqtt).

Shared by the apps' commands:

* :func:`run_app` runs a Typer app so that a bad flag or value is one line on stderr
  naming the option and the accepted values, exit status 2, never a traceback or a
  framed help panel;
* :data:`LogLevel` is the type of every ``--log-level`` option (a choice, so a bad level
  is such a one-line error);
* :func:`setup_logging` configures the root logger and quiets third-party loggers.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points
from typing import Literal

import typer
from typer.exceptions import TyperException

from fedmq import __version__

#: The accepted ``--log-level`` values (case-insensitive on the command line).
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]

#: Third-party loggers held at WARNING whatever the level asked for: at INFO, onnxscript
#: and onnx_ir log about 10 lines per ONNX export (one export per round), amqtt and its
#: state machine (transitions) one per packet; paho, urllib3, matplotlib and PIL add
#: nothing an operator of fedmq needs. ``--log-level DEBUG`` leaves them alone.
QUIET_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx", "amqtt", "transitions", "paho", "urllib3", "matplotlib",
                 "PIL")

PLAIN_FORMAT = "ts=%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)s"


def setup_logging(level: str, *, rich: bool = False, fmt: str = PLAIN_FORMAT) -> None:
    """Log to stderr at ``level``, third-party loggers (:data:`QUIET_LOGGERS`) at WARNING
    unless ``level`` is DEBUG.

    Args:
        level: one of :data:`LogLevel` (any case).
        rich: use rich's handler (for a terminal) instead of plain ``fmt`` lines.
        fmt: format of plain lines (``logging`` %-style).

    Raises:
        ValueError: unknown level (the CLI options are choices, so this is a bug).
    """
    name = level.upper()
    if name not in LogLevel.__args__:  # type: ignore[attr-defined]
        raise ValueError(f"log level {level!r}: expected one of {list(LogLevel.__args__)}")  # type: ignore[attr-defined]
    if rich:
        from rich.logging import RichHandler
        logging.basicConfig(level=name, handlers=[RichHandler(show_path=False)], format="%(message)s", force=True)
    else:
        logging.basicConfig(level=name, stream=sys.stderr, format=fmt, force=True)
    quiet = logging.DEBUG if name == "DEBUG" else logging.WARNING
    for logger in QUIET_LOGGERS:
        logging.getLogger(logger).setLevel(quiet)


def _one_line(exc: TyperException) -> str:
    """The usage error as one line: the command, the problem, where to read more."""
    ctx = getattr(exc, "ctx", None)
    where = ctx.command_path if ctx is not None else "fedmq"
    message = " ".join(exc.format_message().split()).replace("Value error, ", "")  # type: ignore[attr-defined]
    return f"{where}: error: {message} (see {where} --help)"


def run_app(app: typer.Typer, prog_name: str, args: Sequence[str] | None = None) -> None:
    """Run ``app`` as a program: exits with its status.

    A usage error (unknown option, bad value, missing option) prints one line to stderr,
    ``<command>: error: <what, with the accepted values> (see <command> --help)``, and
    exits 2. Ctrl-C exits 130.
    """
    try:
        code = app(args=list(args) if args is not None else None, prog_name=prog_name, standalone_mode=False)
    except TyperException as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":
            code = 2  # the help has been printed
        elif hasattr(exc, "format_message"):
            typer.echo(_one_line(exc), err=True)
            code = getattr(exc, "exit_code", 2)
        else:  # Abort (Ctrl-C at a prompt)
            code = 130
    sys.exit(code if isinstance(code, int) else 0)


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
    run_app(build_app(sys.argv[1] if len(sys.argv) > 1 else None), "fedmq")


if __name__ == "__main__":
    main()
