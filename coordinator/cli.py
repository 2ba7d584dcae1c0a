"""``fedmq coordinator``: run a federation, show its state, export its global model.

``run`` shows live progress with rich on a terminal and writes plain ``key=value`` log
lines otherwise (systemd, CI, pipes). SIGTERM and SIGINT end the run cleanly: a
checkpoint being written is finished, the round in flight is abandoned (the next start
reruns it) and the exit status is 0. ``run`` holds the state folder's lock
(:mod:`coordinator.lock`): a second coordinator on the same folder exits 2 naming the
folder and the pid holding it.

``status [--json]`` reads the state folder (never writes it, so it can run beside a
running coordinator): the fleet at a glance and the rounds summary (:mod:`coordinator.status`).

Exit codes: 0 success; 2 bad flag, configuration or state (one line on stderr naming the
option, path or holder); 1 any other fedmq error (e.g. the broker is unreachable).
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import typer

from coordinator.config import CoordinatorConfig, load_config
from coordinator.service import make_coordinator
from coordinator.lock import lock_state_dir
from coordinator.privacy import checkpoint_privacy
from coordinator.service import Progress
from coordinator.state import StateDB, load_checkpoint
from coordinator.status import build_status, render_text
from fedmq.storage.atomic import atomic_write_bytes
from fedmq.cli import LogLevel, setup_logging
from fedmq.errors import FedmqError
from fedmq.model.modelio import export_onnx, model_to_safetensors
from fedmq.model.params import ParamSpec, load_params
from fedmq.security.sealing import fingerprint, load_or_create_key
from fedmq.tasks import get_task

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="The federated-learning coordinator: rounds, aggregation, global model.")

CONFIG_OPT = typer.Option(..., "--config", "-c", exists=False, help="Coordinator TOML file (docs/coordinator.md).")


def _load(path: Path) -> CoordinatorConfig:
    try:
        return load_config(path)
    except FedmqError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


class _PlainProgress:
    """One ``key=value`` line per event worth logging (not per update)."""

    def __call__(self, p: Progress) -> None:
        if p.kind == "round_open":
            print(f"event=round_open round={p.round} selected={p.selected} target={p.target} online={p.online}",
                  flush=True)
        elif p.kind == "round_closed" and p.record is not None:
            row = p.record.row()
            fields = ("round", "state", "model_version", "participants", "accepted", "rejected_total", "test_accuracy",
                      "test_loss", "bytes_up", "bytes_down", "wall_s", "epsilon")
            print("event=round_closed " + " ".join(f"{k}={_fmt(row[k])}" for k in fields), flush=True)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "na" if value is None else str(value)


class _RichProgress:
    """A live status line per round and a summary line when it closes."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress as Bar, TextColumn, TimeRemainingColumn
        self.console = Console(stderr=True)
        self.bar = Bar(TextColumn("[bold]round {task.fields[round]}"), BarColumn(),
                       TextColumn("{task.completed}/{task.total} accepted, {task.fields[rejected]} rejected"),
                       TimeRemainingColumn(), console=self.console, transient=True)
        self.task_id: Any = None

    def __call__(self, p: Progress) -> None:
        if p.kind == "round_open":
            if self.task_id is None:
                self.bar.start()
                self.task_id = self.bar.add_task("round", total=p.target, round=p.round, rejected=0)
            self.bar.reset(self.task_id, total=p.target, round=p.round, rejected=0)
        elif p.kind == "update" and self.task_id is not None:
            self.bar.update(self.task_id, completed=p.accepted, rejected=p.rejected)
        elif p.kind == "round_closed" and p.record is not None:
            r = p.record
            acc = "n/a" if r.test_accuracy is None else f"{r.test_accuracy:.2%}"
            self.console.print(f"round {r.round} [{'green' if r.state == 'closed' else 'red'}]{r.state}[/]: "
                               f"{r.accepted}/{r.participants} accepted, rejected {r.rejected or '{}'}, "
                               f"test accuracy {acc}, up {r.bytes_up:,} B, down {r.bytes_down:,} B, "
                               f"{r.wall_s:.1f} s")

    def close(self) -> None:
        if self.task_id is not None:
            self.bar.stop()


@app.command()
def run(config: Path = CONFIG_OPT,
        log_level: LogLevel = typer.Option("INFO", case_sensitive=False,
                                           help="DEBUG, INFO, WARNING or ERROR.")) -> None:
    """Run the federation's rounds (resuming from the state folder)."""
    cfg = _load(config)
    tty = sys.stderr.isatty()
    setup_logging(log_level, rich=tty)
    try:
        lock = lock_state_dir(cfg.state_dir)
    except FedmqError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    try:
        _run(cfg, tty)
    finally:
        lock.close()


def _run(cfg: CoordinatorConfig, tty: bool) -> None:
    try:
        coord = make_coordinator(cfg)
    except FedmqError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: coord.stop())
    progress = _RichProgress() if tty else _PlainProgress()
    try:
        result = coord.run(progress_callback=progress)
    except FedmqError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    finally:
        if isinstance(progress, _RichProgress):
            progress.close()
    print(f"event=finished version={result.version} rounds_this_run={len(result.records)} "
          f"stopped={str(result.stopped).lower()}", flush=True)


@app.command()
def status(config: Path = CONFIG_OPT,
           as_json: bool = typer.Option(False, "--json", help="One JSON document (ISO 8601 UTC times) on stdout."),
           last: int = typer.Option(10, "--last", min=1, help="Latest rounds listed in the text form.")) -> None:
    """The fleet at a glance (online, last seen, rounds, bytes, rejections) and the rounds so far."""
    cfg = _load(config)
    now = time.time()
    try:
        doc = build_status(cfg.state_dir, now, cfg.federation, cfg.task,
                           cfg.privacy.delta if cfg.privacy.enabled else None)
    except FedmqError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(doc, indent=2, allow_nan=False) if as_json else render_text(doc, now, last))


@app.command("seal-key")
def seal_key(config: Path = CONFIG_OPT) -> None:
    """Print the path of the coordinator's public key (seal-key.pub in the state folder),
    creating the key pair there first if this coordinator has none yet: give the file to
    'fedmq broker add-device --coordinator-key' so that devices seal their updates to it."""
    cfg = _load(config)
    try:
        key = load_or_create_key(cfg.state_dir)
    except (FedmqError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"# fingerprint {fingerprint(key.public)}", err=True)
    typer.echo(str(key.public_path))


def _export_format(value: str) -> str:
    if value not in ("onnx", "safetensors"):
        raise typer.BadParameter(f"expected onnx or safetensors, got {value!r}")
    return value


@app.command()
def export(config: Path = CONFIG_OPT,
           format: str = typer.Option("safetensors", "--format", callback=_export_format,
                                      help="onnx or safetensors."),
           out: Path = typer.Option(..., "--out", help="File to write (atomically).")) -> None:
    """Write the latest checkpointed global model as ONNX or safetensors."""
    cfg = _load(config)
    try:
        ckpt = load_checkpoint(cfg.state_dir)
        if ckpt is None:
            typer.echo(f"error: no checkpoint in {cfg.state_dir}: run the coordinator first", err=True)
            raise typer.Exit(1)
        task = get_task(cfg.task)
        model = task.build_model(cfg.seed)
        load_params(model, ckpt.model, ParamSpec.from_module(model))
        if format == "onnx":
            export_onnx(model, task, out, metadata=checkpoint_privacy(cfg, ckpt.meta, str(cfg.state_dir)))
        else:
            atomic_write_bytes(out, model_to_safetensors(model, {"version": str(ckpt.version),
                                                                 "round": str(ckpt.round), "task": task.name}))
    except FedmqError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"wrote {out} ({format}, model version {ckpt.version})")
