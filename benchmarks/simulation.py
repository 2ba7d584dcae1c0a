"""Federations for the learning benchmarks: the real coordinator and real edge agents in one process.

:func:`simulate` runs a :class:`FedSetup` through :func:`fleet.demo.run_demo` (the front of
the federation launcher, :mod:`fleet.launch`) with the devices as threads of this process on
the in-memory bus (``memory://``): the same
``Coordinator`` (round engine, aggregation, server optimizer, checkpoints) and the same
``EdgeAgent`` (local training, error feedback, codec, envelope, receipts) that run on a fleet,
exchanging the same messages, chunked blobs and retained models, only not over a socket.
``broker=URL`` runs the same federation through a real broker instead, and
``devices_in="processes"`` with one OS process per device: the figures are the product's.

Scheduling is set so that a run is a pure function of its seed: every device online before
round 1 (``min_devices`` = all), no over-selection, a round waits for all its selected
devices (``min_updates`` = target) under a deadline long enough never to fire, no local
hold-out. The product's defaults (over-selection 1.3, first answers win, 10% hold-out) are
what ``fedmq demo`` measures (the ``broker`` suite).

Bytes: ``bytes_up`` are the client-update blob bytes the coordinator received (manifests
included); ``bytes_down`` the global model blob bytes times the devices sent a task (what
each selected device fetches when it holds no copy).
"""

from __future__ import annotations

import io
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from rich.console import Console

from fedmq.codecs import CodecSpec
from fedmq.wire.messages import TrainPlan

#: Deadline (seconds) long enough never to fire in a benchmark round.
NO_DEADLINE_S = 3600.0


@dataclass(frozen=True)
class FedSetup:
    """One federation.

    Attributes:
        task: task name (``digits-*`` tasks train on the digits, ``mnist-*`` on MNIST-10k).
        devices: number of devices K; device k holds partition k.
        per_round: devices selected per round (uniform, without replacement, no over-selection).
        rounds: number of rounds.
        partition: ``iid`` or ``dirichlet`` (the partitions of ../shared/data/README.md).
        alpha: Dirichlet concentration (non-IID only).
        plan: the devices' training and codec settings (as sent in each task).
        server_optimizer: ``[server_optimizer] name``.
        server_lr: its ``eta``.
        seed: model initialisation, device sampling and local shuffling all derive from it.
        samples_per_device: keep only the first N samples of each partition (None: all).
        test_samples: evaluate on the first N test samples (None: all).
    """

    task: str = "mnist-cnn"
    devices: int = 10
    per_round: int = 5
    rounds: int = 30
    partition: str = "iid"
    alpha: float = 0.5
    plan: TrainPlan = field(default_factory=TrainPlan)
    server_optimizer: str = "fedavg"
    server_lr: float = 1.0
    seed: int = 0
    samples_per_device: int | None = None
    test_samples: int | None = None

    def describe(self) -> dict[str, Any]:
        """JSON-friendly settings (the plan flattened in)."""
        d = asdict(self)
        d["plan"] = self.plan.as_table()
        return d


def simulate(setup: FedSetup, *, target_accuracy: float | None = None, broker: str | None = "memory",
             devices_in: str = "threads") -> dict[str, Any]:
    """Run ``setup`` through the real coordinator and edge agents and measure.

    Args:
        setup: the federation.
        target_accuracy: report the first round whose test accuracy reaches it (fraction).
        broker: ``"memory"`` (the in-process bus), None (the embedded broker) or a broker URL.
        devices_in: ``threads`` or ``processes`` (not with the in-process bus).

    Returns:
        ``{"settings", "final_accuracy", "best_accuracy", "final_loss", "rounds_to_target",
        "bytes_up", "bytes_down", "dense_bytes_up", "seconds", "history": [{"round", "accuracy",
        "loss", "bytes_up", "bytes_down", "dense_bytes_up", "selected"}]}``; accuracies are fractions in [0, 1], bytes
        totals over the run, seconds wall-clock.

    Raises:
        FedmqError: the federation could not run (data missing, broker unreachable, ...).
    """
    from fedmq.data import MNIST_T10K_DIR, shared_data_dir
    from fleet.demo import DemoSettings, Scheduling, run_demo

    data = "digits" if setup.task.startswith("digits") else "mnist"
    train_plan = setup.plan.as_table()
    t0 = time.perf_counter()
    summary = run_demo(DemoSettings(
        devices=setup.devices, per_round=setup.per_round, rounds=setup.rounds, task=setup.task, data=data,
        data_dir=shared_data_dir() / MNIST_T10K_DIR if data == "mnist" else None, partition_scheme=setup.partition,
        alpha=setup.alpha, codec=setup.plan.codec.name, density=setup.plan.codec.density, broker=broker,
        seed=setup.seed, deadline_s=NO_DEADLINE_S, devices_in=devices_in,
        scheduling=Scheduling(over_selection=1.0, min_devices=setup.devices, holdout_fraction=0.0,
                              min_updates=setup.per_round),
        train_plan=train_plan, server_optimizer={"name": setup.server_optimizer, "eta": setup.server_lr},
        samples_per_device=setup.samples_per_device, test_samples=setup.test_samples, write_files=False,
        publish_onnx=False), console=Console(file=io.StringIO()))
    seconds = time.perf_counter() - t0
    history = [{"round": r["round"], "accuracy": r["test_accuracy"], "loss": r["test_loss"],
                "bytes_up": r["bytes_up"], "bytes_down": r["bytes_down"], "dense_bytes_up": r["dense_bytes_up"],
                "selected": sorted(p["device"] for p in r["participations"])} for r in summary["records"]]
    accs = [h["accuracy"] for h in history if h["accuracy"] is not None]
    reached = next((h["round"] for h in history if target_accuracy is not None and h["accuracy"] is not None
                    and h["accuracy"] >= target_accuracy), None)
    return {
        "settings": setup.describe(),
        "final_accuracy": accs[-1] if accs else None,
        "final_loss": history[-1]["loss"] if history else None,
        "best_accuracy": max(accs) if accs else None,
        "target_accuracy": target_accuracy,
        "rounds_to_target": reached,
        "bytes_up": sum(h["bytes_up"] for h in history),
        "bytes_down": sum(h["bytes_down"] for h in history),
        "dense_bytes_up": sum(h["dense_bytes_up"] for h in history),
        "seconds": seconds,
        "history": history,
    }


def with_codec(plan: TrainPlan, name: str, density: float = 0.01, error_feedback: bool = True) -> TrainPlan:
    """``plan`` with another codec setting (everything else, learning included, kept)."""
    return replace(plan, codec=CodecSpec.from_table(name, {"density": density}), error_feedback=error_feedback)
