"""``fedmq demo``: a whole federation on one machine, exactly as it runs on a fleet.

The demo starts an MQTT broker (the embedded amqtt broker on a free loopback port unless
``--broker URL`` is given), writes one data partition, one configuration file and one state
folder per device, starts every edge client as its own process
(``python -m edge_client run -c devices/D/edge.toml``) and runs the coordinator in this
process. Nothing is shared between them but the broker.

Default: scikit-learn's bundled handwritten digits (1,797 real 8x8 images; 1,437 train,
360 test), a 64-256-256-10 MLP, 10 devices with IID partitions, 30 rounds of 5 devices,
Top-K at density 1% with 8-bit values and error feedback.
``--data mnist --data-dir DIR`` uses MNIST IDX files; with the official t10k files (as in
``../shared/data/mnist-t10k``) it uses the MNIST-10k split of ``../shared/data/README.md``.

Outputs with ``--out DIR``: ``summary.json``, ``rounds.csv``, ``model.safetensors``,
``model.onnx``, ``progress.png``, plus the working files (configs, device logs, state).
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w
import typer
from rich.console import Console
from rich.table import Table

from coordinator.config import load_config
from coordinator.service import Coordinator, Progress, RunResult
from coordinator.state import RoundRecord
from fedmq.data import digits_split, load_mnist_dir, mnist10k_partitions, mnist10k_split, partition, save_npz_atomic
from fedmq.errors import ConfigError, FedmqError
from fedmq.modelio import export_onnx, model_to_safetensors
from fedmq.tasks import evaluate, get_task
from fedmq.transport.counting import LINK_BYTES_IN

#: Training settings the demo sends with each task, per data set. Chosen so that the digits
#: demo reaches >= 90% test accuracy in 30 rounds with Top-K 1% + error feedback.
DEMO_PLANS: dict[str, dict[str, Any]] = {
    "digits": {"local_epochs": 5, "batch_size": 32, "lr": 0.1},
    "mnist": {"local_epochs": 1, "batch_size": 32, "lr": 0.05},
}
DEFAULT_TASKS = {"digits": "digits-mlp", "mnist": "mnist-cnn"}

#: Seconds to wait for a device process to leave after SIGTERM before SIGKILL.
_STOP_GRACE_S = 10.0


@dataclass
class DemoData:
    """Per-device train partitions and the coordinator's held-out test set (float32 x, int64 y)."""

    name: str
    parts: list[tuple[np.ndarray, np.ndarray]]
    x_test: np.ndarray
    y_test: np.ndarray


def load_demo_data(data: str, data_dir: Path | None, devices: int, scheme: str, alpha: float) -> DemoData:
    """Load the demo's data set and cut it into ``devices`` partitions.

    Raises:
        ConfigError: unknown data set or scheme. DataError: files missing or corrupt (names the path).
    """
    if data == "digits":
        x_tr, y_tr, x_te, y_te = digits_split()
        parts = partition(y_tr, devices, scheme, alpha)
        name = "digits"
    elif data == "mnist":
        if data_dir is None:
            raise ConfigError("--data mnist needs --data-dir DIR (a folder of MNIST IDX files, e.g. "
                              "../shared/data/mnist-t10k)")
        folder = Path(data_dir)
        if not any((folder / f"train-images-idx3-ubyte{ext}").is_file() for ext in ("", ".gz")):
            # No training set: the official test set alone, cut by the MNIST-10k split of
            # ../shared/data/README.md (mnist10k_split names the path if it is missing too).
            x_tr, y_tr, x_te, y_te = mnist10k_split(folder)
            parts = mnist10k_partitions(devices, scheme, alpha, y_train=y_tr)
            name = "mnist10k"
        else:
            x_tr, y_tr = load_mnist_dir(folder, prefix="train")
            x_te, y_te = load_mnist_dir(folder, prefix="t10k")
            parts = partition(y_tr, devices, scheme, alpha)
            name = "mnist"
    else:
        raise ConfigError(f"--data {data!r}: expected 'digits' or 'mnist'")
    if any(len(p) == 0 for p in parts):
        raise ConfigError(f"partition {scheme!r} (alpha {alpha}) left a device without data; "
                          "raise --alpha or use fewer --devices")
    return DemoData(name, [(x_tr[p], y_tr[p]) for p in parts], x_te, y_te)


def _write_toml(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(data), encoding="utf-8")


def _start_devices(work: Path, ids: list[str], env: dict[str, str]) -> list[subprocess.Popen[bytes]]:
    procs = []
    for device in ids:
        folder = work / "devices" / device
        log = open(folder / "edge.log", "ab")  # noqa: SIM115 - closed with the process
        procs.append(subprocess.Popen([sys.executable, "-m", "edge_client", "run", "-c", str(folder / "edge.toml")],
                                      stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                      start_new_session=True))
        log.close()
    return procs


def _stop_devices(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + _STOP_GRACE_S
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _ratio(dense: int, sent: int) -> float:
    return dense / sent if sent else float("nan")


def write_outputs(out: Path, summary: dict[str, Any], records: list[RoundRecord], result: RunResult,
                  task_name: str) -> None:
    """Write summary.json, rounds.csv, model.safetensors, model.onnx and progress.png into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    rows = [r.row() for r in records]
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with open(out / "rounds.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    (out / "model.safetensors").write_bytes(model_to_safetensors(
        result.model, {"task": task_name, "model_version": str(result.version)}))
    (out / "model.onnx").write_bytes(export_onnx(result.model, task_name))
    _plot(out / "progress.png", summary, records)


def _plot(path: Path, summary: dict[str, Any], records: list[RoundRecord]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r.round for r in records]
    acc = [r.test_accuracy if r.test_accuracy is not None else float("nan") for r in records]
    up = np.cumsum([r.bytes_up for r in records]) / 1e6
    dense = np.cumsum([r.dense_bytes_up for r in records]) / 1e6
    down = np.cumsum([r.bytes_down for r in records]) / 1e6
    dense_down = np.cumsum([summary["dense_model_bytes"] * r.participants for r in records]) / 1e6
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot([0] + rounds, [summary["initial_accuracy"]] + acc, marker="o", ms=3)
    ax1.set(xlabel="round", ylabel="test accuracy", title=f"{summary['task']}: global model accuracy", ylim=(0, 1))
    ax1.grid(alpha=0.3)
    ax2.plot(rounds, up, label=f"uplink ({summary['codec']})")
    ax2.plot(rounds, dense, "--", label="uplink if dense float32")
    ax2.plot(rounds, down, label=f"downlink ({summary['downlink_codec']})")
    ax2.plot(rounds, dense_down, ":", label="downlink if dense (whole model per task)")
    ax2.set(xlabel="round", ylabel="cumulative MB", yscale="log", title="bytes on the wire")
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _per_device(records: list[RoundRecord]) -> dict[str, dict[str, int]]:
    """Device -> bytes down (its link's count, reported with its updates) and up (client-update blobs)."""
    out: dict[str, dict[str, int]] = {}
    for r in records:
        for p in r.participations:
            if not p.transfer_id:
                continue
            d = out.setdefault(p.device, {"bytes_down": 0, "bytes_up": 0})
            d["bytes_down"] += int(p.metrics.get(LINK_BYTES_IN, 0.0))
            d["bytes_up"] += p.bytes_up
    return dict(sorted(out.items()))


def build_summary(task_name: str, devices: int, per_round: int, codec: str, density: float,
                  records: list[RoundRecord], initial_accuracy: float, wall_seconds: float,
                  broker_url: str, *, downlink_codec: str = "none", downlink_density: float = 1.0,
                  dense_model_bytes: int = 0, coordinator_traffic: dict[str, int] | None = None) -> dict[str, Any]:
    """The ``summary.json`` document (byte counts are MQTT payload bytes as the links counted them:
    ``bytes_down_total`` what the broker delivered to the devices, reported by each with its
    updates; ``coordinator_link`` the coordinator's own connection)."""
    closed = [r for r in records if r.test_accuracy is not None]
    bytes_up = sum(r.bytes_up for r in records)
    dense_up = sum(r.dense_bytes_up for r in records)
    return {
        "task": task_name,
        "devices": devices,
        "devices_per_round": per_round,
        "rounds": len(records),
        "rounds_failed": sum(r.state != "closed" for r in records),
        "codec": codec,
        "density": density if codec != "none" else 1.0,
        "initial_accuracy": initial_accuracy,
        "final_accuracy": closed[-1].test_accuracy if closed else initial_accuracy,
        "best_accuracy": max([initial_accuracy] + [r.test_accuracy for r in closed]),
        "accuracy_per_round": [r.test_accuracy for r in records],
        "bytes_up_total": bytes_up,
        "bytes_up_dense_equivalent": dense_up,
        "uplink_ratio": _ratio(dense_up, bytes_up),
        "bytes_down_total": sum(r.bytes_down for r in records),
        "bytes_down_dense_equivalent": dense_model_bytes * sum(r.participants for r in records),
        "downlink_codec": downlink_codec,
        "downlink_density": downlink_density if downlink_codec != "none" else 1.0,
        "dense_model_bytes": dense_model_bytes,
        "bytes_per_device": _per_device(records),
        "coordinator_link": coordinator_traffic or {},
        "updates_accepted": sum(r.accepted for r in records),
        "updates_rejected": sum(sum(r.rejected.values()) for r in records),
        "rejected_by_reason": _sum_reasons(records),
        "wall_seconds": wall_seconds,
        "broker": broker_url,
    }


def _sum_reasons(records: list[RoundRecord]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in records:
        for reason, n in r.rejected.items():
            out[reason] = out.get(reason, 0) + n
    return out


class _ProgressPrinter:
    """Prints one line per closed round (a rich table row on a terminal, plain text otherwise)."""

    def __init__(self, console: Console, procs: list[subprocess.Popen[bytes]], coordinator: Coordinator) -> None:
        self.console = console
        self.procs = procs
        self.coordinator = coordinator

    def __call__(self, p: Progress) -> None:
        if p.kind == "waiting" and all(proc.poll() is not None for proc in self.procs):
            self.console.print("[red]every device process has exited; see devices/*/edge.log[/red]")
            self.coordinator.stop()
        if p.kind != "round_closed" or p.record is None:
            return
        r = p.record
        acc = f"{r.test_accuracy * 100:5.1f}%" if r.test_accuracy is not None else "  n/a"
        rej = sum(r.rejected.values())
        self.console.print(
            f"round {r.round:3d} {r.state:6s} devices {r.accepted}/{r.participants} rejected {rej}  "
            f"acc {acc}  up {_human_bytes(r.bytes_up):>8s}  down {_human_bytes(r.bytes_down):>8s}  "
            f"ratio {_ratio(r.dense_bytes_up, r.bytes_up):5.0f}x  {r.wall_s:4.1f} s",
            highlight=False)


def run_demo(*, devices: int = 10, per_round: int = 5, rounds: int = 30, task: str | None = None,
             data: str = "digits", data_dir: Path | None = None, partition_scheme: str = "iid",
             alpha: float = 0.5, codec: str = "topk-int8", density: float = 0.01, downlink: str | None = None,
             downlink_density: float = 0.01, broker: str | None = None,
             protocol: str = "5", out: Path | None = None, seed: int = 0, deadline_s: float = 60.0,
             console: Console | None = None) -> dict[str, Any]:
    """Run a whole federation on this machine and return the summary (see ``summary.json``).

    Raises:
        ConfigError: invalid flags. DataError: data files missing or corrupt.
        FedmqError: the broker could not be started or reached.
    """
    console = console or Console(soft_wrap=True)
    if devices < 1 or not 1 <= per_round <= devices or rounds < 1:
        raise ConfigError(f"need devices >= 1, 1 <= per-round <= devices and rounds >= 1 "
                          f"(got {devices}, {per_round}, {rounds})")
    if codec not in ("topk-int8", "none"):
        raise ConfigError(f"--codec {codec!r}: expected 'topk-int8' or 'none'")
    if not 0 < density <= 1:
        raise ConfigError(f"--density {density}: expected a fraction in (0, 1]")
    downlink = downlink or codec  # a dense run is dense both ways
    if downlink not in ("topk-int8", "none"):
        raise ConfigError(f"--downlink {downlink!r}: expected 'topk-int8' or 'none'")
    if not 0 < downlink_density <= 1:
        raise ConfigError(f"--downlink-density {downlink_density}: expected a fraction in (0, 1]")
    task_name = task or DEFAULT_TASKS.get(data, "")
    task_def = get_task(task_name)
    dataset = load_demo_data(data, data_dir, devices, partition_scheme, alpha)

    work = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="fedmq-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    federation = "demo"
    ids = [f"device-{i:02d}" for i in range(devices)]
    started = time.monotonic()

    broker_proc = None
    if broker is None:
        from broker.launch import start_embedded

        broker_proc = start_embedded(log_dir=work / "broker")
        broker_url, protocol = f"mqtt://127.0.0.1:{broker_proc.port}", "3.1.1"
    else:
        broker_url = broker
    console.print(f"fedmq demo: {devices} devices, {per_round} per round, {rounds} rounds, task {task_name}, "
                  f"data {dataset.name} ({partition_scheme}), codec {codec}"
                  f"{f' density {density:g}' if codec != 'none' else ''}, downlink {downlink}"
                  f"{f' density {downlink_density:g}' if downlink != 'none' else ''}, broker {broker_url}"
                  f"{' (embedded)' if broker_proc else ''}", highlight=False)
    console.print(f"working folder: {work}", highlight=False)

    # Fresh state every run: the demo is one federation from scratch.
    for sub in ("devices", "coordinator-state"):
        shutil.rmtree(work / sub, ignore_errors=True)
    save_npz_atomic(work / "test.npz", dataset.x_test, dataset.y_test)
    for device, (x, y) in zip(ids, dataset.parts):
        folder = work / "devices" / device
        save_npz_atomic(folder / "data.npz", x, y)
        _write_toml(folder / "edge.toml", {
            "broker_url": broker_url, "protocol": protocol, "device_id": device, "federation": federation,
            "task": task_name, "data": "data.npz", "state_dir": "state", "torch_threads": 1,
            "seed": seed + int(device.rsplit("-", 1)[1])})
    plan = dict(DEMO_PLANS["digits" if data == "digits" else "mnist"])
    plan.update({"codec": codec, "density": density, "error_feedback": codec != "none"})
    coordinator_toml = work / "coordinator.toml"
    _write_toml(coordinator_toml, {
        "federation": federation, "task": task_name, "rounds": rounds, "seed": seed,
        "state_dir": "coordinator-state",
        "broker": {"url": broker_url, "protocol": protocol},
        "round": {"devices_per_round": per_round, "min_updates": max(1, math.ceil(per_round / 2)),
                  # No over-selection: closing on the first answers biased who counts (the
                  # slowest, largest devices were never aggregated on non-IID data), see
                  # BENCHMARKS.md, "Downlink compression and accuracy parity".
                  "over_selection": 1.0, "deadline_s": deadline_s, "wait_for_devices_s": 120.0,
                  "min_devices": per_round},
        "plan": plan,
        # Compressed runs: server momentum closes most of the gap to dense FedAvg
        # (BENCHMARKS.md); a dense run is plain FedAvg, the reference.
        "server_optimizer": ({"name": "fedavgm", "momentum": 0.5} if downlink != "none" else {"name": "fedavg"}),
        "evaluation": {"data": "test.npz"},
        "downlink": {"codec": downlink, "density": downlink_density},
    })

    initial = task_def.build_model(seed)
    initial_accuracy = evaluate(initial, dataset.x_test, dataset.y_test)[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    procs: list[subprocess.Popen[bytes]] = []
    coordinator = Coordinator(load_config(coordinator_toml))
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda *_: coordinator.stop())
    try:
        procs = _start_devices(work, ids, env)
        try:
            result = coordinator.run(progress_callback=_ProgressPrinter(console, procs, coordinator))
        except KeyboardInterrupt:
            coordinator.stop()
            raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        _stop_devices(procs)
        if broker_proc is not None:
            broker_proc.stop()
    wall = time.monotonic() - started
    summary = build_summary(task_name, devices, per_round, codec, density, result.records, initial_accuracy,
                            wall, broker_url, downlink_codec=downlink, downlink_density=downlink_density,
                            dense_model_bytes=len(model_to_safetensors(initial)),
                            coordinator_traffic=coordinator.link.traffic.snapshot())
    write_outputs(work, summary, result.records, result, task_name)
    _print_summary(console, summary, work)
    return summary


def _print_summary(console: Console, s: dict[str, Any], work: Path) -> None:
    table = Table(title="fedmq demo summary", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("task", s["task"])
    table.add_row("rounds (failed)", f"{s['rounds']} ({s['rounds_failed']})")
    table.add_row("test accuracy: initial / final / best",
                  f"{s['initial_accuracy']:.2%} / {s['final_accuracy']:.2%} / {s['best_accuracy']:.2%}")
    table.add_row("client updates accepted / rejected", f"{s['updates_accepted']} / {s['updates_rejected']}")
    table.add_row("uplink bytes (dense float32 equivalent)",
                  f"{_human_bytes(s['bytes_up_total'])} ({_human_bytes(s['bytes_up_dense_equivalent'])})")
    table.add_row("uplink compression ratio", f"{s['uplink_ratio']:.1f}x")
    table.add_row("downlink bytes (dense: whole model per task)",
                  f"{_human_bytes(s['bytes_down_total'])} ({_human_bytes(s['bytes_down_dense_equivalent'])})")
    coord = s.get("coordinator_link") or {}
    if coord:
        table.add_row("coordinator link: sent / received",
                      f"{_human_bytes(coord['bytes_out'])} / {_human_bytes(coord['bytes_in'])}")
    table.add_row("wall time", f"{s['wall_seconds']:.1f} s")
    console.print(table)
    console.print(f"outputs in {work}: summary.json rounds.csv model.safetensors model.onnx progress.png",
                  highlight=False)


def demo_command(
    devices: int = typer.Option(10, help="Edge-client processes to start."),
    per_round: int = typer.Option(5, "--per-round", "--devices-per-round", help="Devices taking part per round."),
    rounds: int = typer.Option(30, help="Rounds to run."),
    task: str = typer.Option("", help="Task (default: digits-mlp for digits, mnist-cnn for mnist)."),
    data: str = typer.Option("digits", help="digits (scikit-learn's bundled 8x8 digits) or mnist."),
    data_dir: Path = typer.Option(None, "--data-dir", help="Folder of MNIST IDX files for --data mnist."),
    partition_: str = typer.Option("iid", "--partition", help="iid or dirichlet."),
    alpha: float = typer.Option(0.5, help="Dirichlet concentration for --partition dirichlet."),
    codec: str = typer.Option("topk-int8", help="topk-int8 (Top-K + int8 + error feedback) or none (dense float32)."),
    density: float = typer.Option(0.01, help="Fraction of each tensor's entries sent (topk-int8)."),
    downlink: str = typer.Option("", help="Downlink codec: topk-int8 (compressed deltas) or none (whole model); "
                                          "default: the same as --codec."),
    downlink_density: float = typer.Option(0.01, "--downlink-density", help="Downlink Top-K density."),
    broker: str = typer.Option(None, help="Broker URL (e.g. mqtt://127.0.0.1:1883); default: embedded broker."),
    protocol: str = typer.Option("5", help="MQTT protocol with --broker: 5 or 3.1.1 (the embedded broker is 3.1.1)."),
    out: Path = typer.Option(None, help="Folder for summary.json, rounds.csv, model files and the plot."),
    seed: int = typer.Option(0, help="Seed of model initialisation, sampling and local shuffling."),
    deadline: float = typer.Option(60.0, help="Round deadline, seconds."),
) -> None:
    """Run a demo federation: embedded broker, N edge-client processes, the coordinator."""
    try:
        run_demo(devices=devices, per_round=per_round, rounds=rounds, task=task or None, data=data,
                 data_dir=data_dir, partition_scheme=partition_, alpha=alpha, codec=codec, density=density,
                 downlink=downlink or None, downlink_density=downlink_density,
                 broker=broker, protocol=protocol, out=out, seed=seed, deadline_s=deadline)
    except FedmqError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
