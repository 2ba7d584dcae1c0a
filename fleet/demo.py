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
import math
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from coordinator.config import FEDAVGM_ETA, FEDAVGM_MOMENTUM
from coordinator.metrics import CoordinatorMetrics
from coordinator.service import Coordinator, Progress, RunResult
from coordinator.state import RoundRecord
from fedmq.data import digits_split, load_mnist_dir, mnist10k_partitions, mnist10k_split, partition
from fedmq.cli import LogLevel, setup_logging
from fedmq.codecs import codec_names
from fedmq.errors import ConfigError, FedmqError
from fedmq.model.modelio import export_onnx, model_to_safetensors
from fedmq.security.sealing import load_or_create_key
from fedmq.tasks import Task, get_task
from fedmq.tasks.builtin import DIGITS_PLAN, MNIST_PLAN
from fedmq.transport.counting import LINK_BYTES_IN
from fleet.launch import (DEVICE_MODES, DeviceProcesses, DeviceThreads, Federation, build_coordinator,
                          coordinator_options, edge_options, run_coordinator, start_broker)

#: Training settings the demo sends with each task, per data set (a task's own
#: ``demo_plan`` wins). Chosen so that the digits demo reaches >= 90% test accuracy in 30
#: rounds with Top-K 1% + error feedback.
DEMO_PLANS: dict[str, dict[str, Any]] = {"digits": DIGITS_PLAN, "mnist": MNIST_PLAN}
DEFAULT_TASKS = {"digits": "digits-mlp", "mnist": "mnist-cnn"}


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
    """Prints one line per closed round (a rich table row on a terminal, plain text otherwise),
    and stops the coordinator once every device has exited."""

    def __init__(self, console: Console, devices: DeviceProcesses | DeviceThreads, coordinator: Coordinator,
                 unit: str) -> None:
        self.console = console
        self.devices = devices
        self.coordinator = coordinator
        #: "round", or "step" for a server step of FedBuff.
        self.unit = unit

    def __call__(self, p: Progress) -> None:
        if p.kind == "waiting" and self.devices.all_exited():
            self.console.print("[red]every device has exited; see devices/*/edge.log[/red]")
            self.coordinator.stop()
        if p.kind != "round_closed" or p.record is None:
            return
        r = p.record
        acc = f"acc {r.test_accuracy * 100:5.1f}%" if r.test_accuracy is not None else \
            (f"loss {r.test_loss:.4g}" if r.test_loss is not None else "acc   n/a")
        rej = sum(r.rejected.values())
        self.console.print(
            f"{self.unit:5s} {r.round:3d} {r.state:6s} devices {r.accepted}/{r.participants} rejected {rej}  "
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


@dataclass(frozen=True)
class DemoSettings:
    """Everything ``fedmq demo`` runs with; the defaults are the demo's (and the product's).

    Attributes:
        devices, per_round, rounds: devices in the federation, taking part per round, rounds
            (in ``async`` mode: client updates per server step, server steps).
        task: a task reference (docs/tasks.md); None: :data:`DEFAULT_TASKS` of ``data``.
        data, data_dir: ``digits`` or ``mnist`` (with ``data_dir``, a folder of MNIST IDX files).
        partition_scheme, alpha: ``iid`` or ``dirichlet`` (label skew of concentration ``alpha``).
        codec, density: the uplink codec (fedmq.codecs) and its Top-K density (fraction).
        downlink, downlink_density: the downlink codec (None: ``none`` under ``privacy``, as the
            coordinator defaults there; otherwise the same as ``codec``) and density.
        broker: None: the embedded broker; ``"memory"``: the in-process bus (devices as
            threads); any other value: the URL of a running broker, spoken to with ``protocol``.
        protocol: MQTT protocol with ``broker``: ``"5"`` or ``"3.1.1"``.
        out: the working and output folder (None: a new temporary folder).
        seed: model initialisation, sampling and local shuffling (device i: ``seed + i``).
        deadline_s: round deadline, seconds (``async``: a task's lease).
        devices_in: ``processes`` (one OS process each, as on a fleet) or ``threads``.
        scheduling: over-selection, devices to wait for, local hold-out (the product defaults).
        train_plan: training-plan keys over the demo's (e.g. ``local_epochs``, ``lr``).
        server_optimizer: the ``[server_optimizer]`` table (None: FedAvgM when either direction
            is compressed, plain FedAvg for a run dense both ways).
        samples_per_device, test_samples: keep only the first N samples of each partition / of
            the test set (None: all).
        aggregation: the ``[aggregation] rule``.
        round_mode: ``sync`` (rounds) or ``async`` (FedBuff).
        write_files: also write the model files and the plot (the simulator leaves them out).
        publish_onnx: the coordinator publishes an ONNX export with every version.
        seal: devices seal their client updates to the coordinator's key (fedmq.security.sealing),
            provisioned as ``fedmq broker add-device --coordinator-key`` does, and the
            coordinator requires it; False: plain envelopes.
        privacy: the ``[privacy]`` table (docs/privacy.md; ``enabled`` is implied); None: none.
        secure_aggregation: every round a secure round (coordinator.secure); a dict: the
            ``[secure_aggregation]`` table's other keys too.
    """

    devices: int = 10
    per_round: int = 5
    rounds: int = 30
    task: str | None = None
    data: str = "digits"
    data_dir: Path | None = None
    partition_scheme: str = "iid"
    alpha: float = 0.5
    codec: str = "topk-int8"
    density: float = 0.01
    downlink: str | None = None
    downlink_density: float = 0.01
    broker: str | None = None
    protocol: str = "5"
    out: Path | None = None
    seed: int = 0
    deadline_s: float = 60.0
    devices_in: str = "processes"
    scheduling: Scheduling = Scheduling()
    train_plan: dict[str, Any] | None = None
    server_optimizer: dict[str, Any] | None = None
    samples_per_device: int | None = None
    test_samples: int | None = None
    aggregation: str = "weighted-mean"
    round_mode: str = "sync"
    write_files: bool = True
    publish_onnx: bool = True
    seal: bool = True
    privacy: dict[str, Any] | None = None
    secure_aggregation: bool | dict[str, Any] = False

    @property
    def task_name(self) -> str:
        return self.task or DEFAULT_TASKS[self.data]

    @property
    def downlink_codec(self) -> str:
        """The downlink codec: a dense run is dense both ways; under differential privacy dense
        (the coordinator's default there, docs/privacy.md); otherwise the uplink's codec."""
        return self.downlink or ("none" if self.privacy else self.codec)

    def validate(self) -> None:
        """Check every setting before anything is started or written.

        Raises:
            ConfigError: the first invalid setting, named by its command-line flag.
        """
        s = self
        if s.devices < 1 or not 1 <= s.per_round <= s.devices or s.rounds < 1:
            raise ConfigError(f"need --devices >= 1, 1 <= --per-round <= --devices and --rounds >= 1 "
                              f"(got {s.devices}, {s.per_round}, {s.rounds})")
        if s.data not in DEFAULT_TASKS:
            raise ConfigError(f"--data {s.data!r}: expected one of {sorted(DEFAULT_TASKS)}")
        if s.partition_scheme not in ("iid", "dirichlet"):
            raise ConfigError(f"--partition {s.partition_scheme!r}: expected 'iid' or 'dirichlet'")
        if not s.alpha > 0:
            raise ConfigError(f"--alpha {s.alpha}: expected a positive number")
        if s.codec not in codec_names():
            raise ConfigError(f"--codec {s.codec!r}: expected one of {codec_names()}")
        if not 0 < s.density <= 1:
            raise ConfigError(f"--density {s.density}: expected a fraction in (0, 1]")
        if s.protocol not in PROTOCOLS:
            raise ConfigError(f"--protocol {s.protocol!r}: expected one of {PROTOCOLS}")
        if not s.deadline_s > 0:
            raise ConfigError(f"--deadline {s.deadline_s}: expected seconds > 0")
        if s.round_mode not in ROUND_MODES:
            raise ConfigError(f"--mode {s.round_mode!r}: expected one of {ROUND_MODES}")
        if s.devices_in not in DEVICE_MODES:
            raise ConfigError(f"devices_in {s.devices_in!r}: expected one of {DEVICE_MODES}")
        if s.broker is not None and s.broker.startswith("memory") and s.devices_in != "threads":
            raise ConfigError("--broker memory runs every device in this process: use --in-process")
        sched = s.scheduling
        if sched.over_selection < 1 or not 0 <= sched.holdout_fraction < 0.5:
            raise ConfigError(f"over-selection {sched.over_selection} (expected >= 1) or hold-out fraction "
                              f"{sched.holdout_fraction} (expected in [0, 0.5)) out of range")
        if s.downlink_codec not in codec_names():
            raise ConfigError(f"--downlink {s.downlink_codec!r}: expected one of {codec_names()}")
        if not 0 < s.downlink_density <= 1:
            raise ConfigError(f"--downlink-density {s.downlink_density}: expected a fraction in (0, 1]")

    def coordinator_tables(self, task: Task) -> dict[str, Any]:
        """The demo's own tables of the coordinator's configuration (the rest is the
        launcher's: :func:`fleet.launch.coordinator_options`)."""
        sched = self.scheduling
        train_plan = dict(task.demo_plan or DEMO_PLANS["digits" if self.data == "digits" else "mnist"])
        train_plan.update({"codec": self.codec, "density": self.density, "error_feedback": self.codec != "none"})
        train_plan.update(self.train_plan or {})
        secure = self.secure_aggregation
        return {
            "round": {"mode": self.round_mode, "devices_per_round": self.per_round,
                      "min_updates": sched.min_updates or max(1, math.ceil(self.per_round / 2)),
                      "over_selection": sched.over_selection, "deadline_s": self.deadline_s,
                      "wait_for_devices_s": 120.0, "min_devices": sched.min_devices or self.per_round},
            "plan": train_plan,
            # Compressed runs: server momentum closes most of the gap to dense FedAvg
            # (BENCHMARKS.md); a run dense both ways is plain FedAvg, the reference. With the
            # uplink compressed and the downlink dense (the default under DP) FedAvgM too:
            # 98.06% against 95.83% with FedAvg on the digits demo, in memory, one seed.
            "server_optimizer": self.server_optimizer or (
                {"name": "fedavgm", "momentum": FEDAVGM_MOMENTUM, "eta": FEDAVGM_ETA}
                if self.codec != "none" or self.downlink_codec != "none" else {"name": "fedavg"}),
            "downlink": {"codec": self.downlink_codec, "density": self.downlink_density},
            "aggregation": {"rule": self.aggregation},
            **({"privacy": dict(self.privacy, enabled=True)} if self.privacy else {}),
            "sealing": {"required": self.seal},
            "secure_aggregation": ({"enabled": True, **secure} if isinstance(secure, dict) else {"enabled": secure}),
            # Async: K = --per-round updates per server step, every device may train at once,
            # a task's lease is the round deadline.
            **({"async": {"buffer_size": self.per_round, "concurrency": self.devices,
                          "task_timeout_s": self.deadline_s}} if self.round_mode == "async" else {}),
        }

    def edge_tables(self, index: int) -> dict[str, Any]:
        """Device ``index``'s own options (the rest is :func:`fleet.launch.edge_options`)."""
        return {"torch_threads": 1, "holdout_fraction": self.scheduling.holdout_fraction,
                **({"coordinator_key": "coordinator.pub"} if self.seal else {})}


def _load_data(settings: DemoSettings, task: Task) -> DemoData:
    s = settings
    if task.reference_data is not None:
        dataset = load_task_data(task, s.devices, s.partition_scheme, s.alpha)
    else:
        dataset = load_demo_data(s.data, s.data_dir, s.devices, s.partition_scheme, s.alpha)
    if s.samples_per_device is None and s.test_samples is None:
        return dataset
    return DemoData(dataset.name, [(x[:s.samples_per_device], y[:s.samples_per_device]) for x, y in dataset.parts],
                    dataset.x_test[:s.test_samples], dataset.y_test[:s.test_samples])


def _write_data(work: Path, task: Task, dataset: DemoData, ids: list[str], seal: bool) -> Path:
    """Every file in the task's own format: the coordinator reads its test set, and each
    device its partition, with the task's loader, as on a real fleet. Sealed: the
    coordinator's key pair, made where the coordinator finds it, and its public key beside
    each device's configuration, as provisioning gives it to a real device. Returns the test
    set's file."""
    test_file = work / ("test" + Path(task.data_file).suffix)
    task.write_local(test_file, dataset.x_test, dataset.y_test)
    public_pem = load_or_create_key(work / "coordinator-state").public_path.read_bytes() if seal else b""
    for device, (x, y) in zip(ids, dataset.parts):
        folder = work / "devices" / device
        folder.mkdir(parents=True, exist_ok=True)
        task.write_local(folder / task.data_file, x, y)
        if seal:
            (folder / "coordinator.pub").write_bytes(public_pem)
    return test_file


def run_demo(settings: DemoSettings, *, console: Console | None = None,
             metrics: CoordinatorMetrics | None = None) -> dict[str, Any]:
    """Run a whole federation on this machine (:mod:`fleet.launch`) and return the summary
    (see ``summary.json``).

    The coordinator runs in this process; the devices as processes or threads
    (``settings.devices_in``). Every setting is checked before anything is started or
    written; whatever the demo started is stopped on every way out.

    Args:
        settings: :class:`DemoSettings`.
        console: where progress and the summary are printed (default: the terminal).
        metrics: the coordinator's Prometheus metrics go there (the caller serves them and
            keeps them after the run); None: a registry of the run's own, not served.

    Returns:
        the summary; ``"records"`` additionally holds every round's record (as dicts); with
        ``privacy``, a ``privacy`` entry (epsilon spent, delta, noise multiplier, clip norm).

    Raises:
        ConfigError: invalid settings, or ``out`` holds files no demo created. DataError: data
        files missing or corrupt. FedmqError: the broker could not be started or reached.
    """
    s = settings
    console = console or Console(soft_wrap=True)
    s.validate()
    task = get_task(s.task_name, where="--task")
    folder = _OutFolder(s.out)
    folder.check()
    dataset = _load_data(s, task)

    federation = "demo"
    ids = [f"device-{i:02d}" for i in range(s.devices)]
    started = time.monotonic()
    work = folder.prepare()
    broker = start_broker(s.broker, work, protocol=s.protocol)
    fed = None
    try:
        # FedBuff has no rounds: --rounds counts server steps of --per-round client updates.
        steps = (f"{s.per_round} per round, {s.rounds} rounds" if s.round_mode == "sync" else
                 f"{s.per_round} client updates per server step, {s.rounds} server steps")
        console.print(f"fedmq demo: {s.devices} devices ({s.devices_in}), {steps}, "
                      f"task {task.name}, data {dataset.name} ({s.partition_scheme}), codec {s.codec}"
                      f"{f' density {s.density:g}' if s.codec != 'none' else ''}, broker {broker.url}"
                      f"{' (embedded)' if broker.kind == 'embedded' else ''}", highlight=False)
        console.print(f"working folder: {work}", highlight=False)
        test_file = _write_data(work, task, dataset, ids, s.seal)
        fed = Federation.create(
            work, broker, devices_in=s.devices_in,
            coordinator=coordinator_options(
                federation=federation, task=s.task_name, broker=broker, rounds=s.rounds, seed=s.seed,
                state_dir="coordinator-state", evaluation_data=test_file.name, publish_onnx=s.publish_onnx,
                **s.coordinator_tables(task)),
            devices={device: edge_options(device_id=device, federation=federation, task=s.task_name, broker=broker,
                                          data=task.data_file, seed=s.seed + i, **s.edge_tables(i))
                     for i, device in enumerate(ids)})
        folder.record()
        initial = task.evaluate(task.build_model(s.seed), dataset.x_test, dataset.y_test)
        coordinator = build_coordinator(fed.files.coordinator, metrics=metrics, environ={})
        fed.devices.start_all()
        result = run_coordinator(coordinator, _ProgressPrinter(console, fed.devices, coordinator,
                                                               "round" if s.round_mode == "sync" else "step"))
    finally:
        if fed is not None:
            fed.close()
        else:
            broker.close()
        folder.record()
    wall = time.monotonic() - started
    summary = build_summary(task.name, s.devices, s.per_round, s.codec, s.density, result.records,
                            initial.get("accuracy"), wall, broker.url, initial_loss=initial["loss"],
                            downlink_codec=s.downlink_codec, downlink_density=s.downlink_density,
                            dense_model_bytes=len(model_to_safetensors(task.build_model(s.seed))),
                            coordinator_traffic=coordinator.link.traffic.snapshot())
    summary["devices_in"] = s.devices_in
    summary["sealed"] = s.seal
    summary["secure_aggregation"] = bool(s.secure_aggregation)
    if coordinator.privacy is not None:
        summary["privacy"] = coordinator.privacy.summary()
    write_outputs(work, summary, result.records, result, task, model_files=s.write_files)
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
                                          "default: the same as --codec (none with --privacy)."),
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
        settings = DemoSettings(
            devices=devices, per_round=per_round, rounds=rounds, task=task or None, data=data, data_dir=data_dir,
            partition_scheme=partition_, alpha=alpha, codec=codec, density=density, downlink=downlink or None,
            downlink_density=downlink_density, broker=broker, protocol=protocol, out=out, seed=seed,
            deadline_s=deadline, devices_in="threads" if in_process else "processes", round_mode=mode, seal=seal,
            privacy=demo_privacy(devices, per_round, rounds, epsilon, noise_multiplier, clip_norm, delta,
                                 adaptive_clipping, dp_noise) if privacy else None)
        # --secure-aggregation: the same federation twice, plain then secure, in out/plain and out/secure.
        runs = [replace(settings, out=out / kind if out is not None else None, secure_aggregation=secure)
                for kind, secure in (("plain", False), ("secure", True))] if secure_aggregation else [settings]
        if secure_aggregation and settings.privacy and settings.privacy.get("noise") == "distributed":
            # The plain run's counterpart of noise on the masked sum: the same noise on the sum,
            # added by the coordinator (distributed shares would need an uncompressed uplink).
            runs[0] = replace(runs[0], privacy=dict(settings.privacy, noise="central"))
        summaries = [run_demo(run) for run in runs]
        if secure_aggregation:
            print_secure_cost(Console(soft_wrap=True), *summaries)
    except FedmqError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
