"""Scaffold against FedAvg, FedAvgM (the default) and FedProx on label-skewed data: accuracy,
rounds to a target accuracy, and bytes both ways at the same density.

Every case runs the product's path, ``fleet.demo.run_demo``: the real coordinator and real
edge agents (threads of this process) on the in-memory bus (``--broker memory``, the default)
or through a mosquitto this benchmark starts on loopback (``--broker mosquitto``), a
Dirichlet(``alpha``) split, the shipped codecs both ways (Top-K + int8 + error feedback up,
the compressed downlink with server-side error feedback), the same rounds, density, plan and
seed for every case. Bytes are what the links counted through the broker: ``bytes_up`` the
client-update blobs the coordinator received, ``bytes_down`` what the devices' links took in
(global model versions and, for Scaffold, the control variate's chain).

Cases (``--case``, repeatable; default all four):

* ``fedavg``: FedAvg (server learning rate 1, no momentum);
* ``fedavgm``: the product's default, FedAvgM;
* ``fedprox``: FedProx (``prox_mu``, default 0.01) with FedAvgM;
* ``scaffold``: Scaffold (``[plan] algorithm = "scaffold"``) with FedAvgM;
* ``scaffold-fedavg``: Scaffold with FedAvg (the paper's server step), not in the default set.

``python -m benchmarks.scaffold`` runs digits (digits-mlp, 20 devices, 5 per round, 30
rounds, Dirichlet 0.1 and 0.5); ``--quick`` 10 rounds and Dirichlet 0.1 only; the MNIST-10k
CNN: ``--task mnist-cnn --data mnist --data-dir ../shared/data/mnist-t10k``. Prints one JSON
line per (alpha, case) and a table; ``--out FILE`` writes them as JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from fleet.demo import DemoSettings, Scheduling, run_demo
from fleet.launch import start_broker

CASES: dict[str, dict[str, Any]] = {
    "fedavg": {"server_optimizer": {"name": "fedavg"}},
    "fedavgm": {},
    "fedprox": {"plan": {"prox_mu": None}},
    "scaffold": {"plan": {"algorithm": "scaffold"}},
    "scaffold-fedavg": {"plan": {"algorithm": "scaffold"}, "server_optimizer": {"name": "fedavg"}},
}
DEFAULT_CASES = ("fedavg", "fedavgm", "fedprox", "scaffold")


def rounds_to(accuracies: list[float | None], target: float) -> int | None:
    """First round (from 1) whose test accuracy is at least ``target``, None if none."""
    for i, acc in enumerate(accuracies, start=1):
        if acc is not None and acc >= target:
            return i
    return None


def run_case(case: str, alpha: float, args: argparse.Namespace, broker: str, work: Path) -> dict[str, Any]:
    spec = CASES[case]
    plan = dict(spec.get("plan", {}))
    if "prox_mu" in plan:
        plan["prox_mu"] = args.prox_mu
    t0 = time.monotonic()
    out = run_demo(DemoSettings(
        devices=args.devices, per_round=args.per_round, rounds=args.rounds, task=args.task, data=args.data,
        data_dir=args.data_dir, partition_scheme="dirichlet", alpha=alpha, density=args.density,
        downlink_density=args.density, broker=broker, devices_in="threads", seed=args.seed, deadline_s=args.deadline,
        publish_onnx=False, train_plan=plan or None, server_optimizer=spec.get("server_optimizer"),
        samples_per_device=args.samples,
        scheduling=Scheduling(over_selection=1.0, min_devices=args.devices, min_updates=args.per_round),
        out=work / f"{case}-{alpha}", write_files=False), console=Console(file=io.StringIO()))
    acc = out["accuracy_per_round"][-args.rounds:]
    return {"case": case, "alpha": alpha, "task": args.task, "rounds": args.rounds, "density": args.density,
            "final_accuracy": out["final_accuracy"], "best_accuracy": max(a for a in acc if a is not None),
            "rounds_to_95": rounds_to(acc, 0.95), f"rounds_to_{round(100 * args.target)}": rounds_to(acc, args.target),
            "bytes_up": out["bytes_up_total"], "bytes_down": out["bytes_down_total"],
            "rounds_failed": out["rounds_failed"], "accuracy_per_round": acc,
            "wall_s": round(time.monotonic() - t0, 1)}


def format_table(rows: list[dict[str, Any]], target: float) -> str:
    key = f"rounds_to_{round(100 * target)}"
    lines = [f"| alpha | case | final acc | best acc | rounds to 95% | rounds to {target:.0%} | bytes up | "
             f"bytes down | up vs fedavgm | down vs fedavgm |", "|" + " --- |" * 10]
    base = {r["alpha"]: r for r in rows if r["case"] == "fedavgm"}
    for r in rows:
        ref = base.get(r["alpha"])
        up = f"{r['bytes_up'] / ref['bytes_up']:.2f}x" if ref else "-"
        down = f"{r['bytes_down'] / ref['bytes_down']:.2f}x" if ref else "-"
        lines.append(f"| {r['alpha']} | {r['case']} | {r['final_accuracy']:.4f} | {r['best_accuracy']:.4f} | "
                     f"{r['rounds_to_95'] or '-'} | {r[key] or '-'} | {r['bytes_up']:,} | {r['bytes_down']:,} | "
                     f"{up} | {down} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="10 rounds, Dirichlet 0.1 only")
    p.add_argument("--case", action="append", choices=sorted(CASES), help="cases to run (default: the four)")
    p.add_argument("--alpha", action="append", type=float, help="Dirichlet alphas (default 0.1 and 0.5)")
    p.add_argument("--task", default="digits-mlp")
    p.add_argument("--data", default="digits", choices=("digits", "mnist"))
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--devices", type=int, default=20)
    p.add_argument("--per-round", type=int, default=5)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--samples", type=int, default=None, help="keep the first N samples of each device")
    p.add_argument("--density", type=float, default=0.01, help="Top-K density, both ways")
    p.add_argument("--prox-mu", type=float, default=0.01)
    p.add_argument("--target", type=float, default=0.8, help="the second accuracy target reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deadline", type=float, default=300.0)
    p.add_argument("--broker", choices=("memory", "mosquitto"), default="memory")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.rounds = min(args.rounds, 10)
    alphas = args.alpha or ([0.1] if args.quick else [0.1, 0.5])
    cases = args.case or list(DEFAULT_CASES)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fedmq-scaffold-") as tmp:
        work = Path(tmp)
        # One mosquitto serves every case; run_demo makes a fresh in-memory bus for each.
        mosquitto = start_broker("mosquitto", work) if args.broker == "mosquitto" else None
        try:
            for alpha in alphas:
                for case in cases:
                    broker = "memory" if mosquitto is None else mosquitto.url
                    row = run_case(case, alpha, args, broker, work)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        finally:
            if mosquitto is not None:
                mosquitto.close()
    print(format_table(rows, args.target))
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    return rows


if __name__ == "__main__":
    main()
