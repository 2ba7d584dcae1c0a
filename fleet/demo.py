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
``--task REF`` runs any task (docs/tasks.md: ``package.module:attribute``, a built-in or an
entry-point name); a task with its own reference data set (``Task.reference_data``) is
trained on that, each device's partition written in the task's format (``Task.save_data``).

Outputs with ``--out DIR``: ``summary.json``, ``rounds.csv``, ``model.safetensors``,
``model.onnx``, ``progress.png``, plus the working files (configs, device logs, state).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import tomli_w
import typer
from rich.console import Console
from rich.table import Table

from coordinator.config import FEDAVGM_ETA, FEDAVGM_MOMENTUM, load_config
from coordinator.metrics import CoordinatorMetrics
from coordinator.buffered import make_coordinator
from coordinator.service import Coordinator, Progress, RunResult
from coordinator.state import RoundRecord
from fedmq.data import digits_split, load_mnist_dir, mnist10k_partitions, mnist10k_split, partition
from fedmq.cli import LogLevel, setup_logging
from fedmq.codecs import codec_names
from fedmq.errors import ConfigError, FedmqError
from fedmq.modelio import export_onnx, model_to_safetensors
from fedmq.sealing import load_or_create_key
from fedmq.tasks import Task, get_task
from fedmq.tasks.builtin import DIGITS_PLAN, MNIST_PLAN
from fedmq.transport.counting import LINK_BYTES_IN

#: Training settings the demo sends with each task, per data set (a task's own
#: ``demo_plan`` wins). Chosen so that the digits demo reaches >= 90% test accuracy in 30
#: rounds with Top-K 1% + error feedback.
DEMO_PLANS: dict[str, dict[str, Any]] = {"digits": DIGITS_PLAN, "mnist": MNIST_PLAN}
DEFAULT_TASKS = {"digits": "digits-mlp", "mnist": "mnist-cnn"}

log = logging.getLogger("fedmq.demo")

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


def load_task_data(task: Task, devices: int, scheme: str, alpha: float) -> DemoData:
    """The task's reference data set (:meth:`fedmq.tasks.Task.reference_split`) cut into
    ``devices`` partitions (Dirichlet label skew only for classification).

    Raises:
        ConfigError: no reference data, a Dirichlet partition of a regression task, or a
            device left without data. DataError: the data does not fit the task.
    """
    x_tr, y_tr, x_te, y_te = task.reference_split()
    if scheme == "dirichlet" and task.kind != "classification":
        raise ConfigError(f"--partition dirichlet skews class labels; task {task.name!r} is a {task.kind} task: "
                          "use --partition iid")
    parts = partition(y_tr, devices, scheme, alpha)
    if any(len(p) == 0 for p in parts):
        raise ConfigError(f"partition {scheme!r} (alpha {alpha}) left a device without data; "
                          "raise --alpha or use fewer --devices")
    return DemoData(task.name, [(x_tr[p], y_tr[p]) for p in parts], x_te, y_te)


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
                  task: Task, *, model_files: bool = True) -> None:
    """Write summary.json and rounds.csv into ``out``, and with ``model_files`` also
    model.safetensors, model.onnx and progress.png."""
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
    if not model_files:
        return
    (out / "model.safetensors").write_bytes(model_to_safetensors(
        result.model, {"task": task.name, "model_version": str(result.version)}))
    (out / "model.onnx").write_bytes(export_onnx(result.model, task))
    _plot(out / "progress.png", summary, records)


def _plot(path: Path, summary: dict[str, Any], records: list[RoundRecord]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r.round for r in records]
    # A regression task has no accuracy: its test loss is plotted instead.
    metric, label = ("test_accuracy", "test accuracy") if summary["initial_accuracy"] is not None else \
        ("test_loss", "test loss")
    acc = [getattr(r, metric) if getattr(r, metric) is not None else float("nan") for r in records]
    up = np.cumsum([r.bytes_up for r in records]) / 1e6
    dense = np.cumsum([r.dense_bytes_up for r in records]) / 1e6
    down = np.cumsum([r.bytes_down for r in records]) / 1e6
    dense_down = np.cumsum([summary["dense_model_bytes"] * r.participants for r in records]) / 1e6
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot([0] + rounds, [summary[metric.replace("test", "initial")]] + acc, marker="o", ms=3)
    ax1.set(xlabel="round", ylabel=label, title=f"{summary['task']}: global model {label.removeprefix('test ')}")
    if metric == "test_accuracy":
        ax1.set_ylim(0, 1)
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
                  records: list[RoundRecord], initial_accuracy: float | None, wall_seconds: float,
                  broker_url: str, initial_loss: float | None = None, *, downlink_codec: str = "none",
                  downlink_density: float = 1.0, dense_model_bytes: int = 0,
                  coordinator_traffic: dict[str, int] | None = None) -> dict[str, Any]:
    """The ``summary.json`` document (byte counts are MQTT payload bytes as the links counted them:
    ``bytes_down_total`` what the broker delivered to the devices, reported by each with its
    updates; ``coordinator_link`` the coordinator's own connection; accuracies are None for a
    regression task, whose ``*_loss`` fields carry the result)."""
    closed = [r for r in records if r.test_accuracy is not None]
    with_loss = [r for r in records if r.test_loss is not None]
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
        "best_accuracy": (max([initial_accuracy] + [r.test_accuracy for r in closed])
                          if initial_accuracy is not None else None),
        "initial_loss": initial_loss,
        "final_loss": with_loss[-1].test_loss if with_loss else initial_loss,
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

    def __init__(self, console: Console, procs: list[subprocess.Popen[bytes]], threads: _Threads,
                 coordinator: Coordinator) -> None:
        self.console = console
        self.procs = procs
        self.threads = threads
        self.coordinator = coordinator

    def __call__(self, p: Progress) -> None:
        if p.kind == "waiting" and ((self.procs and all(proc.poll() is not None for proc in self.procs))
                                    or self.threads.all_exited()):
            self.console.print("[red]every device has exited; see devices/*/edge.log[/red]")
            self.coordinator.stop()
        if p.kind != "round_closed" or p.record is None:
            return
        r = p.record
        acc = f"acc {r.test_accuracy * 100:5.1f}%" if r.test_accuracy is not None else \
            (f"loss {r.test_loss:.4g}" if r.test_loss is not None else "acc   n/a")
        rej = sum(r.rejected.values())
        self.console.print(
            f"round {r.round:3d} {r.state:6s} devices {r.accepted}/{r.participants} rejected {rej}  "
            f"{acc}  up {_human_bytes(r.bytes_up):>8s}  down {_human_bytes(r.bytes_down):>8s}  "
            f"ratio {_ratio(r.dense_bytes_up, r.bytes_up):5.0f}x  {r.wall_s:4.1f} s",
            highlight=False)


@dataclass(frozen=True)
class Scheduling:
    """Who takes part and how long a round waits; the demo's defaults are the product's.

    Attributes:
        over_selection: devices selected = ``ceil(per_round * over_selection)``.
        min_devices: eligible devices to wait for before a round opens (None: ``per_round``).
        holdout_fraction: fraction of each device's samples kept for its local validation.
        min_updates: accepted updates a round needs (None: ``ceil(per_round / 2)``).
    """

    #: No over-selection: closing on the first answers biased who counts (the slowest,
    #: largest devices were never aggregated on non-IID data; BENCHMARKS.md, "Downlink
    #: compression and accuracy parity").
    over_selection: float = 1.0
    min_devices: int | None = None
    holdout_fraction: float = 0.0
    min_updates: int | None = None


#: Where device agents run: ``processes`` (one OS process each, exactly as on a fleet) or
#: ``threads`` (one thread each in this process; the only way onto the in-memory bus).
DEVICE_MODES = ("processes", "threads")
ROUND_MODES = ("sync", "async")
PROTOCOLS = ("5", "3.1.1")
MARKER = ".fedmq-demo.json"


class _OutFolder:
    """The demo's working folder: refuses a non-empty folder it did not create, and on a
    rerun removes only the files its marker lists (files an earlier demo run created)."""

    def __init__(self, out: Path | None) -> None:
        self.given = out is not None
        self.path = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="fedmq-demo-"))

    def check(self) -> None:
        """Raise ConfigError when the folder holds files no demo run created (nothing is touched)."""
        path = self.path
        if path.exists() and not path.is_dir():
            raise ConfigError(f"--out {path}: exists and is not a folder")
        if not path.is_dir():
            return
        owned = set(self._owned())
        foreign = [p for p in path.rglob("*") if p.is_file() and p.relative_to(path).as_posix() not in owned
                   and p.name != MARKER]
        if foreign:
            raise ConfigError(f"--out {path}: the folder holds files this demo did not create (e.g. "
                              f"{foreign[0]}); give an empty or new folder")

    def _owned(self) -> list[str]:
        marker = self.path / MARKER
        if not marker.is_file():
            return []
        try:
            files = json.loads(marker.read_text(encoding="utf-8")).get("files", [])
        except (OSError, ValueError, AttributeError):
            raise ConfigError(f"{marker}: unreadable marker of an earlier demo run; remove it or give another "
                              f"--out") from None
        return [f for f in files if isinstance(f, str)]

    def prepare(self) -> Path:
        """Remove what an earlier demo run left (only files its marker lists) and create the folder."""
        self.check()
        parents: set[Path] = set()
        for rel in self._owned():
            (self.path / rel).unlink(missing_ok=True)
            parents.update(p for p in (self.path / rel).parents if self.path in p.parents)
        for folder in sorted(parents, key=lambda p: len(p.parts), reverse=True):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        self.path.mkdir(parents=True, exist_ok=True)
        self.record()
        return self.path

    def record(self) -> None:
        """List every file now in the folder as the demo's own (the folder had none of anyone else's)."""
        files = sorted(p.relative_to(self.path).as_posix() for p in self.path.rglob("*")
                       if p.is_file() and p.name != MARKER)
        (self.path / MARKER).write_text(json.dumps({"files": files}, indent=1) + "\n", encoding="utf-8")


def _validate(devices: int, per_round: int, rounds: int, data: str, partition_scheme: str, alpha: float,
              codec: str, density: float, broker: str | None, protocol: str, deadline_s: float,
              devices_in: str, scheduling: Scheduling, round_mode: str) -> None:
    if devices < 1 or not 1 <= per_round <= devices or rounds < 1:
        raise ConfigError(f"need --devices >= 1, 1 <= --per-round <= --devices and --rounds >= 1 "
                          f"(got {devices}, {per_round}, {rounds})")
    if data not in DEFAULT_TASKS:
        raise ConfigError(f"--data {data!r}: expected one of {sorted(DEFAULT_TASKS)}")
    if partition_scheme not in ("iid", "dirichlet"):
        raise ConfigError(f"--partition {partition_scheme!r}: expected 'iid' or 'dirichlet'")
    if not alpha > 0:
        raise ConfigError(f"--alpha {alpha}: expected a positive number")
    if codec not in codec_names():
        raise ConfigError(f"--codec {codec!r}: expected one of {codec_names()}")
    if not 0 < density <= 1:
        raise ConfigError(f"--density {density}: expected a fraction in (0, 1]")
    if protocol not in PROTOCOLS:
        raise ConfigError(f"--protocol {protocol!r}: expected one of {PROTOCOLS}")
    if not deadline_s > 0:
        raise ConfigError(f"--deadline {deadline_s}: expected seconds > 0")
    if round_mode not in ROUND_MODES:
        raise ConfigError(f"--mode {round_mode!r}: expected one of {ROUND_MODES}")
    if devices_in not in DEVICE_MODES:
        raise ConfigError(f"devices_in {devices_in!r}: expected one of {DEVICE_MODES}")
    if broker is not None and broker.startswith("memory") and devices_in != "threads":
        raise ConfigError("--broker memory runs every device in this process: use --in-process")
    if scheduling.over_selection < 1 or not 0 <= scheduling.holdout_fraction < 0.5:
        raise ConfigError(f"over-selection {scheduling.over_selection} (expected >= 1) or hold-out fraction "
                          f"{scheduling.holdout_fraction} (expected in [0, 0.5)) out of range")


class _Threads:
    """Edge agents as threads of this process (each with its own link, state folder, data)."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []

    def start(self, configs: list[Path]) -> None:
        from edge_client.agent import EdgeAgent
        from edge_client.config import load_config as load_edge_config

        for path in configs:
            agent = EdgeAgent(load_edge_config(path, environ={}), environ={})

            def run(agent: EdgeAgent = agent) -> None:
                try:
                    agent.run(self.stop)
                except BaseException as exc:  # noqa: BLE001 - reported by alive()/the summary
                    self.errors.append(exc)
                    log.error("device %s stopped: %s", agent.cfg.device_id, exc)

            thread = threading.Thread(target=run, name=f"edge-{agent.cfg.device_id}", daemon=True)
            thread.start()
            self.threads.append(thread)

    def all_exited(self) -> bool:
        return bool(self.threads) and not any(t.is_alive() for t in self.threads)

    def close(self) -> None:
        self.stop.set()
        deadline = time.monotonic() + _STOP_GRACE_S
        for t in self.threads:
            t.join(timeout=max(0.1, deadline - time.monotonic()))


def run_demo(*, devices: int = 10, per_round: int = 5, rounds: int = 30, task: str | None = None,
             data: str = "digits", data_dir: Path | None = None, partition_scheme: str = "iid",
             alpha: float = 0.5, codec: str = "topk-int8", density: float = 0.01, downlink: str | None = None,
             downlink_density: float = 0.01, broker: str | None = None,
             protocol: str = "5", out: Path | None = None, seed: int = 0, deadline_s: float = 60.0,
             devices_in: str = "processes", scheduling: Scheduling | None = None,
             plan: dict[str, Any] | None = None, server_optimizer: dict[str, Any] | None = None,
             samples_per_device: int | None = None, test_samples: int | None = None,
             aggregation: str = "weighted-mean", round_mode: str = "sync",
             write_files: bool = True, publish_onnx: bool = True, console: Console | None = None,
             metrics: CoordinatorMetrics | None = None, seal: bool = True,
             privacy: dict[str, Any] | None = None,
             secure_aggregation: bool | dict[str, Any] = False) -> dict[str, Any]:
    """Run a whole federation on this machine and return the summary (see ``summary.json``).

    The coordinator runs in this process; the devices as processes (``devices_in``, the
    default: as on a fleet) or as threads of this process. ``broker``: None starts the
    embedded broker, ``"memory"`` uses the in-process bus (devices as threads), any other
    value is the URL of a running broker. Every flag is checked before anything is started
    or written; whatever the demo started is stopped on every way out.

    Args:
        scheduling: over-selection, devices to wait for, local hold-out (the product defaults).
        plan: train-plan keys over the demo's (e.g. ``local_epochs``, ``lr``).
        server_optimizer: the ``[server_optimizer]`` table (default FedAvg).
        aggregation: the ``[aggregation] rule``.
        round_mode: ``sync`` (rounds) or ``async`` (FedBuff: ``per_round`` updates per server
            step, ``rounds`` server steps, ``deadline_s`` a task's lease).
        samples_per_device, test_samples: keep only the first N samples of each partition / of
            the test set (None: all).
        write_files: also write the model files and the plot (the simulator leaves them out).
        publish_onnx: the coordinator publishes an ONNX export with every version.
        seal: devices seal their client updates to the coordinator's key (fedmq.sealing),
            provisioned as ``fedmq broker add-device --coordinator-key`` does, and the
            coordinator requires it (default); False: plain envelopes, as before sealing.
        secure_aggregation: every round a secure round (``[secure_aggregation] enabled``,
            coordinator.secure): the coordinator learns only the survivors' sum; a dict: the
            ``[secure_aggregation]`` table's other keys too.
        metrics: the coordinator's Prometheus metrics go there (the caller serves them and
            keeps them after the run); None: a registry of the run's own, not served.
        privacy: the ``[privacy]`` table (differential privacy, docs/privacy.md; ``enabled`` is
            implied); None: none. The summary then has a ``privacy`` entry (epsilon spent, delta,
            noise multiplier, clip norm).

    Returns:
        the summary; ``"records"`` additionally holds every round's record (as dicts).

    Raises:
        ConfigError: invalid flags, or ``out`` holds files no demo created. DataError: data
        files missing or corrupt. FedmqError: the broker could not be started or reached.
    """
    console = console or Console(soft_wrap=True)
    sched = scheduling or Scheduling()
    _validate(devices, per_round, rounds, data, partition_scheme, alpha, codec, density, broker, protocol,
              deadline_s, devices_in, sched, round_mode)
    task_name = task or DEFAULT_TASKS[data]
    task_def = get_task(task_name, where="--task")
    folder = _OutFolder(out)
    folder.check()
    if task_def.reference_data is not None:
        dataset = load_task_data(task_def, devices, partition_scheme, alpha)
    else:
        dataset = load_demo_data(data, data_dir, devices, partition_scheme, alpha)
    if samples_per_device is not None or test_samples is not None:
        dataset = DemoData(dataset.name, [(x[:samples_per_device], y[:samples_per_device]) for x, y in dataset.parts],
                           dataset.x_test[:test_samples], dataset.y_test[:test_samples])
    downlink = downlink or codec  # a dense run is dense both ways
    if downlink not in codec_names():
        raise ConfigError(f"--downlink {downlink!r}: expected one of {codec_names()}")
    if not 0 < downlink_density <= 1:
        raise ConfigError(f"--downlink-density {downlink_density}: expected a fraction in (0, 1]")

    federation = "demo"
    ids = [f"device-{i:02d}" for i in range(devices)]
    started = time.monotonic()
    broker_proc = None
    procs: list[subprocess.Popen[bytes]] = []
    threads = _Threads()
    bus_name = None
    work = folder.prepare()
    try:
        if broker is None:
            from broker.launch import start_embedded

            broker_proc = start_embedded(log_dir=work / "broker")
            broker_url, protocol = f"mqtt://127.0.0.1:{broker_proc.port}", "3.1.1"
        elif broker.startswith("memory"):
            bus_name = f"demo-{os.getpid()}-{time.monotonic_ns()}"
            broker_url = f"memory://{bus_name}"
        else:
            broker_url = broker
        console.print(f"fedmq demo: {devices} devices ({devices_in}), {per_round} per round, {rounds} rounds, "
                      f"task {task_def.name}, data {dataset.name} ({partition_scheme}), codec {codec}"
                      f"{f' density {density:g}' if codec != 'none' else ''}, broker {broker_url}"
                      f"{' (embedded)' if broker_proc else ''}", highlight=False)
        console.print(f"working folder: {work}", highlight=False)

        # Every file in the task's own format: the coordinator reads its test set, and each
        # device its partition, with the task's loader, as on a real fleet.
        test_file = work / ("test" + Path(task_def.data_file).suffix)
        task_def.write_local(test_file, dataset.x_test, dataset.y_test)
        configs = []
        # The coordinator's key pair, made where the coordinator finds it; each device gets the
        # public key beside its configuration, as provisioning gives it to a real device.
        public_pem = load_or_create_key(work / "coordinator-state").public_path.read_bytes() if seal else b""
        for device, (x, y) in zip(ids, dataset.parts):
            dev_folder = work / "devices" / device
            dev_folder.mkdir(parents=True, exist_ok=True)
            task_def.write_local(dev_folder / task_def.data_file, x, y)
            _write_toml(dev_folder / "edge.toml", {
                "device_id": device, "federation": federation, "task": task_name, "data": task_def.data_file,
                "state_dir": "state", "torch_threads": 1, "holdout_fraction": sched.holdout_fraction,
                "seed": seed + int(device.rsplit("-", 1)[1]),
                "broker": {"url": broker_url, "protocol": protocol},
                **({"coordinator_key": "coordinator.pub"} if seal else {})})
            if seal:
                (dev_folder / "coordinator.pub").write_bytes(public_pem)
            configs.append(dev_folder / "edge.toml")
        plan_table = dict(task_def.demo_plan or DEMO_PLANS["digits" if data == "digits" else "mnist"])
        plan_table.update({"codec": codec, "density": density, "error_feedback": codec != "none"})
        plan_table.update(plan or {})
        coordinator_toml = work / "coordinator.toml"
        _write_toml(coordinator_toml, {
            "federation": federation, "task": task_name, "rounds": rounds, "seed": seed,
            "state_dir": "coordinator-state",
            "broker": {"url": broker_url, "protocol": protocol},
            "round": {"mode": round_mode, "devices_per_round": per_round,
                      "min_updates": sched.min_updates or max(1, math.ceil(per_round / 2)),
                      "over_selection": sched.over_selection, "deadline_s": deadline_s, "wait_for_devices_s": 120.0,
                      "min_devices": sched.min_devices or per_round},
            "plan": plan_table,
            # Compressed runs: server momentum closes most of the gap to dense FedAvg
            # (BENCHMARKS.md); a dense run is plain FedAvg, the reference.
            "server_optimizer": server_optimizer or ({"name": "fedavgm", "momentum": FEDAVGM_MOMENTUM,
                                                                       "eta": FEDAVGM_ETA} if downlink != "none"
                                                     else {"name": "fedavg"}),
            "downlink": {"codec": downlink, "density": downlink_density},
            "aggregation": {"rule": aggregation},
            **({"privacy": dict(privacy, enabled=True)} if privacy else {}),
            "evaluation": {"data": test_file.name},
            "publish": {"onnx": publish_onnx},
            "sealing": {"required": seal},
            "secure_aggregation": ({"enabled": True, **secure_aggregation} if isinstance(secure_aggregation, dict)
                                   else {"enabled": secure_aggregation}),
            # Async: K = --per-round updates per server step, every device may train at once,
            # a task's lease is the round deadline.
            **({"async": {"buffer_size": per_round, "concurrency": devices, "task_timeout_s": deadline_s}}
               if round_mode == "async" else {}),
        })
        folder.record()

        initial = task_def.evaluate(task_def.build_model(seed), dataset.x_test, dataset.y_test)
        coordinator = make_coordinator(load_config(coordinator_toml, environ={}), metrics=metrics)
        previous = signal.getsignal(signal.SIGTERM)
        in_main = threading.current_thread() is threading.main_thread()
        if in_main:
            signal.signal(signal.SIGTERM, lambda *_: coordinator.stop())
        try:
            if devices_in == "processes":
                procs = _start_devices(work, ids, dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
            else:
                threads.start(configs)
            try:
                result = coordinator.run(progress_callback=_ProgressPrinter(console, procs, threads, coordinator))
            except KeyboardInterrupt:
                coordinator.stop()
                raise
        finally:
            if in_main:
                signal.signal(signal.SIGTERM, previous)
    finally:
        threads.close()
        _stop_devices(procs)
        if broker_proc is not None:
            broker_proc.stop()
        if bus_name is not None:
            from fedmq.transport.memory import drop_bus

            drop_bus(bus_name)
        folder.record()
    wall = time.monotonic() - started
    summary = build_summary(task_def.name, devices, per_round, codec, density, result.records,
                            initial.get("accuracy"), wall, broker_url, initial_loss=initial["loss"],
                            downlink_codec=downlink, downlink_density=downlink_density,
                            dense_model_bytes=len(model_to_safetensors(task_def.build_model(seed))),
                            coordinator_traffic=coordinator.link.traffic.snapshot())
    summary["devices_in"] = devices_in
    summary["sealed"] = seal
    summary["secure_aggregation"] = bool(secure_aggregation)
    if coordinator.privacy is not None:
        summary["privacy"] = coordinator.privacy.summary()
    write_outputs(work, summary, result.records, result, task_def, model_files=write_files)
    folder.record()
    _print_summary(console, summary, work)
    return dict(summary, records=[asdict(r) for r in result.records])


def _print_summary(console: Console, s: dict[str, Any], work: Path) -> None:
    table = Table(title="fedmq demo summary", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("task", s["task"])
    table.add_row("rounds (failed)", f"{s['rounds']} ({s['rounds_failed']})")
    if s["initial_accuracy"] is not None:
        table.add_row("test accuracy: initial / final / best",
                      f"{s['initial_accuracy']:.2%} / {s['final_accuracy']:.2%} / {s['best_accuracy']:.2%}")
    table.add_row("test loss: initial / final", f"{s['initial_loss']:.4g} / {s['final_loss']:.4g}")
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
    dp = s.get("privacy")
    if dp:
        table.add_row("differential privacy", f"epsilon {dp['epsilon']:.3g} at delta {dp['delta']:g} "
                                              f"(sigma {dp['noise_multiplier']:.3g}, clip {dp['clip_norm']:.3g})")
    console.print(table)
    if dp:
        console.print(
            f"privacy: this model is ({dp['epsilon']:.3g}, {dp['delta']:g})-differentially private at the level of a "
            f"device{'' if dp['epsilon'] <= 3 else ' - a weak guarantee'}. With {s['devices']} devices and "
            f"{s['devices_per_round']} per round the noise needed for a small epsilon would swamp the model; "
            f"useful models at epsilon <= 3 need hundreds of devices per round (docs/privacy.md)."
            + (f" Stopped early: {dp['budget_exhausted']}." if dp.get("budget_exhausted") else ""),
            highlight=False)
    console.print(f"outputs in {work}: summary.json rounds.csv model.safetensors model.onnx progress.png",
                  highlight=False)


def demo_privacy(devices: int, per_round: int, rounds: int, epsilon: float, noise_multiplier: float,
                 clip_norm: float, delta: float, adaptive_clipping: bool, noise: str) -> dict[str, Any]:
    """The ``[privacy]`` table of ``fedmq demo --privacy``: Poisson sampling at rate
    ``per_round / devices``; sigma as given, else calibrated from ``epsilon`` over ``rounds``,
    else 1.0."""
    table: dict[str, Any] = {"clip_norm": clip_norm, "delta": delta, "adaptive_clipping": adaptive_clipping,
                             "noise": noise, "sampling": "poisson", "sampling_rate": min(1.0, per_round / devices),
                             "rounds": rounds}
    if epsilon > 0:
        table["target_epsilon"] = epsilon
    if noise_multiplier > 0 or epsilon <= 0:
        table["noise_multiplier"] = noise_multiplier if noise_multiplier > 0 else 1.0
    return table


def secure_cost(plain: dict[str, Any], secure: dict[str, Any]) -> dict[str, Any]:
    """What secure aggregation cost against the plain run of the same federation: final test
    accuracy, the bytes the coordinator's link sent and received through the broker (models
    and version chains once per version, tasks, client updates or masked inputs, key, share
    and unmasking messages: every message of the run), the devices' uplink, and the median
    wall time of a round."""
    def side(s: dict[str, Any]) -> dict[str, Any]:
        link = s.get("coordinator_link") or {}
        walls = sorted(r["wall_s"] for r in s["records"])
        return {"final_accuracy": s["final_accuracy"], "rounds_failed": s["rounds_failed"],
                "coordinator_bytes_out": link.get("bytes_out", 0), "coordinator_bytes_in": link.get("bytes_in", 0),
                "uplink_bytes": s["bytes_up_total"], "round_wall_s_median": walls[len(walls) // 2] if walls else 0.0,
                "wall_seconds": s["wall_seconds"]}
    return {"plain": side(plain), "secure": side(secure)}


def print_secure_cost(console: Console, plain: dict[str, Any], secure: dict[str, Any]) -> dict[str, Any]:
    """Print :func:`secure_cost` as a table; returns it."""
    cost = secure_cost(plain, secure)
    p, s = cost["plain"], cost["secure"]
    table = Table(title="secure aggregation: cost against the plain run")
    for col in ("", "plain", "secure", "secure / plain"):
        table.add_column(col, justify="right")

    def ratio(a: float, b: float) -> str:
        return f"{b / a:.2f}x" if a else "-"

    table.add_row("final test accuracy", f"{p['final_accuracy']:.2%}", f"{s['final_accuracy']:.2%}",
                  f"{(s['final_accuracy'] - p['final_accuracy']) * 100:+.1f} pp")
    table.add_row("rounds failed", str(p["rounds_failed"]), str(s["rounds_failed"]), "")
    for key, label in (("coordinator_bytes_out", "coordinator sent (models, tasks, secure messages)"),
                       ("coordinator_bytes_in", "coordinator received (all messages)"),
                       ("uplink_bytes", "client updates / secure messages received")):
        table.add_row(label, _human_bytes(p[key]), _human_bytes(s[key]), ratio(p[key], s[key]))
    table.add_row("wall time per round (median)", f"{p['round_wall_s_median']:.2f} s",
                  f"{s['round_wall_s_median']:.2f} s", f"{s['round_wall_s_median'] - p['round_wall_s_median']:+.2f} s")
    console.print(table)
    return cost


def demo_command(
    devices: int = typer.Option(10, help="Edge-client processes to start."),
    per_round: int = typer.Option(5, "--per-round", "--devices-per-round", help="Devices taking part per round."),
    rounds: int = typer.Option(30, help="Rounds to run."),
    task: str = typer.Option("", help="Task: package.module:attribute, a built-in or entry-point name "
                                      "(default: digits-mlp for digits, mnist-cnn for mnist; docs/tasks.md)."),
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
    protocol: Literal["5", "3.1.1"] = typer.Option("5", help="MQTT protocol with --broker: 5 or 3.1.1 (the embedded "
                                                              "broker is 3.1.1)."),
    out: Path = typer.Option(None, help="Folder for summary.json, rounds.csv, model files and the plot."),
    seed: int = typer.Option(0, help="Seed of model initialisation, sampling and local shuffling."),
    deadline: float = typer.Option(60.0, help="Round deadline, seconds."),
    log_level: LogLevel = typer.Option("WARNING", case_sensitive=False, help="DEBUG, INFO, WARNING or ERROR."),
    mode: str = typer.Option("sync", help="sync (rounds) or async (buffered asynchronous aggregation, FedBuff: "
                                          "--per-round updates per server step, --rounds server steps)."),
    in_process: bool = typer.Option(False, "--in-process",
                                    help="Run the edge agents as threads of this process instead of one process "
                                         "each (needed with --broker memory)."),
    seal: bool = typer.Option(True, "--seal/--no-seal",
                              help="Devices seal their client updates to the coordinator's public key, so the "
                                   "broker relays only ciphertext (docs/security.md); --no-seal: plain updates."),
    privacy: bool = typer.Option(False, "--privacy", help="Client-level differential privacy (DP-FedAvg with "
                                                          "an accountant; docs/privacy.md)."),
    epsilon: float = typer.Option(0.0, "--epsilon", help="With --privacy: the privacy budget (target epsilon); "
                                                         "0: none, only --noise-multiplier."),
    noise_multiplier: float = typer.Option(0.0, "--noise-multiplier",
                                           help="With --privacy: sigma (0: calibrated from --epsilon, or 1.0)."),
    clip_norm: float = typer.Option(1.0, "--clip-norm", help="With --privacy: clip norm C of a client update."),
    delta: float = typer.Option(1e-5, "--delta", help="With --privacy: delta of the (epsilon, delta) guarantee."),
    adaptive_clipping: bool = typer.Option(False, "--adaptive-clipping",
                                           help="With --privacy: the clip norm follows the median update norm "
                                                "(Andrew et al. 2021)."),
    dp_noise: str = typer.Option("central", "--dp-noise",
                                 help="With --privacy: central (the coordinator adds the noise) or distributed "
                                      "(each device adds its share; needs --codec none)."),
    secure_aggregation: bool = typer.Option(False, "--secure-aggregation",
                                            help="Run the federation twice, plain then with secure aggregation "
                                                 "(docs/security.md), and print what the secure rounds cost."),
) -> None:
    """Run a demo federation: embedded broker, N edge-client processes, the coordinator.

    --broker memory --in-process runs the same federation on the in-memory bus: the
    simulator that the learning benchmarks use."""
    setup_logging(log_level)
    try:
        runs = [False, True] if secure_aggregation else [False]
        summaries = [run_demo(devices=devices, per_round=per_round, rounds=rounds, task=task or None, data=data,
                              data_dir=data_dir, partition_scheme=partition_, alpha=alpha, codec=codec,
                              density=density, downlink=downlink or None, downlink_density=downlink_density,
                              broker=broker, protocol=protocol,
                              out=(out / ("secure" if secure else "plain")) if out is not None and secure_aggregation
                              else out, seed=seed, deadline_s=deadline,
                              devices_in="threads" if in_process else "processes", round_mode=mode, seal=seal,
                              secure_aggregation=secure,
                              privacy=demo_privacy(devices, per_round, rounds, epsilon, noise_multiplier,
                                                   clip_norm, delta, adaptive_clipping, dp_noise)
                              if privacy else None) for secure in runs]
        if secure_aggregation:
            print_secure_cost(Console(soft_wrap=True), *summaries)
    except FedmqError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
