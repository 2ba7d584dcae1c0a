"""The smart-plug example (task ``acsf1-cnn``, ACS-F1 appliance signatures bundled with
sktime): federated against centralised training, same model, same split.

* federated: ``fleet.demo.run_demo`` (the product's path: a real broker, one process per
  device, the coordinator), 5 devices holding Dirichlet(0.5) label-skewed partitions of the
  archive's 100 training series, all 5 per round, the task's plan (5 local epochs, batch 8,
  lr 0.05), dense float32 updates and Top-K 10% + int8 with error feedback;
* centralised: :func:`fedmq.fl.training.train_local` on the whole training set for the
  same number of passes over the data (rounds x local epochs), same batch size and lr.

Both are scored by :meth:`fedmq.tasks.Task.evaluate` on the archive's 100 test series.

``python -m benchmarks.iot [--rounds 30] [--broker URL]`` prints the JSON result.
Needs ``fedmq[iot]`` (sktime) and ``fedmq[demo]``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

TASK = "acsf1-cnn"


def central(rounds: int, seed: int = 0) -> dict[str, Any]:
    """Centralised training of the task's model on the whole training set."""
    from fedmq.fl.training import train_local
    from fedmq.wire.messages import TrainPlan
    from fedmq.tasks import get_task

    task = get_task(TASK)
    x_tr, y_tr, x_te, y_te = task.reference_split()
    plan = dict(task.demo_plan)
    epochs = rounds * int(plan.pop("local_epochs"))
    model = task.build_model(seed)
    started = time.monotonic()
    train_local(model, x_tr, y_tr, TrainPlan(local_epochs=epochs, **plan), rng=np.random.default_rng(seed), task=task)
    metrics = task.evaluate(model, x_te, y_te)
    return {"epochs": epochs, "test_accuracy": metrics["accuracy"], "test_loss": metrics["loss"],
            "seconds": time.monotonic() - started}


def federated(rounds: int, codec: str, density: float, broker: str | None, seed: int = 0) -> dict[str, Any]:
    """One demo federation; the summary fields that matter here."""
    from rich.console import Console

    from fleet.demo import DemoSettings, run_demo

    with tempfile.TemporaryDirectory(prefix="fedmq-bench-iot-") as tmp:
        s = run_demo(DemoSettings(
            devices=5, per_round=5, rounds=rounds, task=TASK, partition_scheme="dirichlet", alpha=0.5, codec=codec,
            density=density, broker=broker, out=Path(tmp), seed=seed),
            console=Console(file=open("/dev/null", "w"), soft_wrap=True))  # noqa: SIM115
    keys = ("final_accuracy", "best_accuracy", "initial_accuracy", "final_loss", "rounds", "rounds_failed",
            "bytes_up_total", "bytes_up_dense_equivalent", "uplink_ratio", "bytes_down_total", "updates_accepted",
            "wall_seconds", "broker")
    return {"codec": codec, "density": density if codec != "none" else 1.0, **{k: s[k] for k in keys}}


def run(rounds: int = 30, broker: str | None = None) -> dict[str, Any]:
    return {"task": TASK, "devices": 5, "partition": "dirichlet(0.5)", "rounds": rounds,
            "central": central(rounds),
            "federated": [federated(rounds, "none", 1.0, broker), federated(rounds, "topk-int8", 0.1, broker)]}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.iot", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--broker", default=None, help="broker URL (default: the embedded broker)")
    args = p.parse_args()
    print(json.dumps(run(args.rounds, args.broker), indent=2))


if __name__ == "__main__":
    main()
