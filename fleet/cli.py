"""``fedmq fleet``: run a fleet of virtual devices (fleet/fleet.py) against a broker.

``fedmq fleet run -c fleet.toml`` starts the fleet (:class:`fleet.fleet.Fleet`, the virtual
devices of the federation launcher :mod:`fleet.launch`) and prints its totals every few seconds
until SIGINT / SIGTERM or ``--duration`` seconds; with ``--coordinator coordinator.toml``
it waits for the devices to connect, runs that coordinator (either mode) in this process
until its rounds are done, then stops the fleet and writes ``summary.json`` in the work
folder. Options are documented in docs/scale.md.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import typer

from fedmq.storage.atomic import atomic_write_text
from fedmq.errors import FedmqError

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Many virtual devices (the real edge agent) against a real broker.")


@app.callback()
def _group() -> None:
    """Many virtual devices (the real edge agent) against a real broker (docs/scale.md)."""


@app.command()
def run(config: Path = typer.Option(None, "--config", "-c", help="Fleet TOML file (docs/scale.md)."),
        broker: str = typer.Option(None, "--broker", help="Broker URL (overrides broker_url)."),
        federation: str = typer.Option(None, "--federation", help="Federation id (overrides the file)."),
        devices: int = typer.Option(None, "--devices", "-n", help="Number of virtual devices."),
        processes: int = typer.Option(None, "--processes", "-p", help="Worker processes."),
        seed: int = typer.Option(None, "--seed", help="Seed of every draw."),
        network: str = typer.Option(None, "--network",
                                    help="threads (two threads per device) or shared (one network loop per worker "
                                         "process, event-driven agents: ten thousand devices)."),
        work_dir: Path = typer.Option(None, "--work", help="Folder of the devices' data and state."),
        coordinator: Path = typer.Option(None, "--coordinator",
                                         help="Coordinator TOML: run it here once the devices are connected."),
        connect_timeout: float = typer.Option(300.0, help="Seconds to wait for every device to connect."),
        duration: float = typer.Option(0.0, help="Without --coordinator: stop after this many seconds (0: never)."),
        log_level: str = typer.Option("warning", help="Log level of this process.")) -> None:
    """Start the fleet; optionally run a coordinator against it."""
    from coordinator.config import load_config
    from fleet.fleet import Fleet, load_fleet_spec
    from fleet.launch import build_coordinator, run_coordinator

    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="ts=%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)s")
    try:
        spec = load_fleet_spec(config, {"broker_url": broker, "federation": federation, "devices": devices,
                                        "processes": processes, "seed": seed, "work_dir": work_dir,
                                        "network": network})
        if coordinator is not None:
            # Checked now, before any device starts; the coordinator itself is built once the
            # fleet has written its files (its held-out test set among them).
            load_config(coordinator)
    except FedmqError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    stop = threading.Event()
    running: list[Any] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: (stop.set(), [c.stop() for c in running]))
    started = time.monotonic()
    summary: dict[str, Any] = {"devices": spec.devices, "processes": spec.processes}
    try:
        fleet = Fleet(spec).start()
    except FedmqError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    try:
        ok = fleet.wait_connected(spec.devices, connect_timeout)
        summary["connect_s"] = round(time.monotonic() - started, 2)
        summary["connected"] = fleet.connected()
        print(json.dumps({"event": "connected", "all": ok, **fleet.totals()}), flush=True)
        if coordinator is not None and not stop.is_set():
            try:
                coord = build_coordinator(coordinator)
            except FedmqError as exc:  # its test set or state folder, found bad only now
                typer.echo(f"error: {exc}", err=True)
                raise typer.Exit(2) from None
            running.append(coord)
            result = run_coordinator(coord)
            summary["rounds"] = [r.row() for r in result.records]
            if getattr(coord, "privacy", None) is not None:
                summary["privacy"] = coord.privacy.summary()
            for r in result.records:
                print(json.dumps({"event": "round", "round": r.round, "accepted": r.accepted,
                                  "test_accuracy": r.test_accuracy, "wall_s": round(r.wall_s, 3)}), flush=True)
        else:
            end = started + duration if duration > 0 else float("inf")
            while not stop.wait(min(5.0, max(0.0, end - time.monotonic()))) and time.monotonic() < end:
                print(json.dumps({"event": "totals", **fleet.totals()}), flush=True)
        summary["totals"] = fleet.totals()
    finally:
        results = fleet.stop()
    summary["trainings"] = sum(len(d["trainings"]) for d in results)
    summary["dropouts"] = sum(d["dropouts"] for d in results)
    atomic_write_text(spec.work_dir / "summary.json", json.dumps(summary, indent=1))
    print(json.dumps({"event": "stopped", "summary": str(spec.work_dir / "summary.json")}), flush=True)
