"""``fedmq coordinator``: run a federation, show its state, export its global model.

``run`` shows live progress with rich on a terminal and writes plain ``key=value`` log
lines otherwise (systemd, CI, pipes). SIGTERM and SIGINT end the run cleanly: a
checkpoint being written is finished, the round in flight is abandoned (the next start
reruns it) and the exit status is 0.
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from typing import Any

import typer

from coordinator.config import CoordinatorConfig, load_config
from coordinator.service import Coordinator, Progress
from coordinator.state import StateDB, load_checkpoint
from fedmq.atomic import atomic_write_bytes
from fedmq.errors import FedmqError
from fedmq.modelio import export_onnx, model_to_safetensors
from fedmq.params import ParamSpec, load_params
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
                      "test_loss", "bytes_up", "bytes_down", "wall_s")
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
        log_level: str = typer.Option("INFO", help="Python logging level.")) -> None:
    """Run the federation's rounds (resuming from the state folder)."""
    cfg = _load(config)
    tty = sys.stderr.isatty()
    if tty:
        from rich.logging import RichHandler
        logging.basicConfig(level=log_level.upper(), handlers=[RichHandler(show_path=False)], format="%(message)s")
    else:
        logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                            format="ts=%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)s")
    try:
        coord = Coordinator(cfg)
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
def status(config: Path = CONFIG_OPT) -> None:
    """Rounds and devices recorded in the state folder."""
    cfg = _load(config)
    try:
        ckpt = load_checkpoint(cfg.state_dir)
        db = StateDB(cfg.state_dir)
    except FedmqError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    try:
        from rich.console import Console
        from rich.table import Table
        console = Console()
        head = "no checkpoint yet" if ckpt is None else f"last finished round {ckpt.round}, model version {ckpt.version}"
        console.print(f"federation {cfg.federation}, task {cfg.task}: {head}")
        rounds = Table("round", "state", "version", "selected", "accepted", "rejected", "test acc", "bytes up",
                       "bytes down", "wall s", title="rounds")
        for r in db.rounds():
            rounds.add_row(str(r["round"]), r["state"], str(r["model_version"]), str(r["participants"]),
                           str(r["accepted"]), ", ".join(f"{k}:{v}" for k, v in r["rejected"].items()) or "-",
                           _fmt(r["test_accuracy"]), f"{r['bytes_up']:,}", f"{r['bytes_down']:,}", f"{r['wall_s']:.1f}")
        console.print(rounds)
        devices = Table("device", "online", "task", "spec", "samples", "rounds", "bytes sent", "bytes received",
                        "last seen", title="devices")
        received = db.bytes_down_by_device()
        for d in db.devices():
            devices.add_row(d.device, "yes" if d.online else "no", d.task, d.spec_hash, str(d.samples), str(d.rounds),
                            f"{d.bytes_up:,}", f"{received.get(d.device, 0):,}", _fmt(d.last_seen))
        console.print(devices)
    finally:
        db.close()


@app.command()
def export(config: Path = CONFIG_OPT,
           format: str = typer.Option("safetensors", "--format", help="onnx or safetensors."),
           out: Path = typer.Option(..., "--out", help="File to write (atomically).")) -> None:
    """Write the latest checkpointed global model as ONNX or safetensors."""
    cfg = _load(config)
    if format not in ("onnx", "safetensors"):
        typer.echo(f"error: --format must be onnx or safetensors, got {format!r}", err=True)
        raise typer.Exit(2)
    try:
        ckpt = load_checkpoint(cfg.state_dir)
        if ckpt is None:
            typer.echo(f"error: no checkpoint in {cfg.state_dir}: run the coordinator first", err=True)
            raise typer.Exit(1)
        task = get_task(cfg.task)
        model = task.build_model(cfg.seed)
        load_params(model, ckpt.model, ParamSpec.from_module(model))
        if format == "onnx":
            export_onnx(model, task, out)
        else:
            atomic_write_bytes(out, model_to_safetensors(model, {"version": str(ckpt.version),
                                                                 "round": str(ckpt.round), "task": task.name}))
    except FedmqError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"wrote {out} ({format}, model version {ckpt.version})")
