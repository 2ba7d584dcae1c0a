"""Compressed downlink against dense: accuracy and bytes both ways, one process, in-memory bus.

The real coordinator (:class:`coordinator.service.Coordinator`) and real edge agents
(:class:`edge_client.agent.EdgeAgent`, one thread each) on the in-memory bus (``memory://``),
started by the federation launcher (fleet/launch.py), with the demo's data, partitions and training plans (fleet/demo.py). Bytes are the bus's own
count of the payload bytes it delivered to and took from each device
(:attr:`fedmq.transport.memory.MemoryBus.stats`). Threads share one interpreter, so wall
times are not a device's; the learning and the bytes are the same code paths as ``fedmq demo``.

Run: ``python -m benchmarks.downlink --data digits --case dense --case compressed`` (cases
below; ``--data mnist --data-dir DIR`` for the MNIST-10k CNN). Prints one JSON line per case
and seed. ``--seeds N`` runs seeds ``--seed .. --seed+N-1`` of every case and ends with one
``summary`` line per case (mean, median and minimum final accuracy over the seeds): the digits
test set has 360 images, and one seed's final accuracy moves by a point from round to round.
``--set SECTION.KEY=VALUE`` overrides a coordinator setting for every case (VALUE as JSON,
else a string), e.g. ``--set server_optimizer.eta=1.0``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from fedmq.data import save_npz_atomic
from fedmq.transport.memory import get_bus
from fleet.demo import DEFAULT_TASKS, DEMO_PLANS, load_demo_data
from fleet.launch import (Federation, build_coordinator, coordinator_options, edge_options, merge_tables,
                          run_coordinator, start_broker)

#: name -> (uplink codec, coordinator overrides). "dense" is FedAvg with float32 both ways.
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "dense": ("none", {"downlink": {"codec": "none"}, "server_optimizer": {"name": "fedavg"}}),
    "uplink-only": ("topk-int8", {"downlink": {"codec": "none"}, "warmup": {"rounds": 0}}),
    "compressed": ("topk-int8", {"warmup": {"rounds": 0}}),
    "compressed-fedavgm": ("topk-int8", {"warmup": {"rounds": 0},
                                         "server_optimizer": {"name": "fedavgm", "momentum": 0.5}}),
    "compressed-warmup": ("topk-int8", {"warmup": {"rounds": 5, "start": 0.25}}),
    "compressed-warmup-fedavgm": ("topk-int8", {"warmup": {"rounds": 5, "start": 0.25},
                                                "server_optimizer": {"name": "fedavgm", "momentum": 0.5}}),
}


def run_case(case: str, *, data: str, data_dir: Path | None, devices: int, per_round: int, rounds: int,
             partition: str, alpha: float, seed: int, over_selection: float, holdout: float,
             work: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """One federation through the launcher (fleet/launch.py: the in-memory bus, devices as
    threads, the coordinator in this thread); returns accuracy per round and the bus's byte
    counts. ``extra``: coordinator settings merged over the case's (nested dicts, as in
    coordinator.toml)."""
    codec, overrides = CASES[case]
    dataset = load_demo_data(data, data_dir, devices, partition, alpha)
    task = DEFAULT_TASKS[data]
    fed = "bench"
    save_npz_atomic(work / "test.npz", dataset.x_test, dataset.y_test)
    plan = dict(DEMO_PLANS["digits" if data == "digits" else "mnist"], codec=codec, density=0.01,
                error_feedback=codec != "none")
    broker = start_broker("memory", work)
    cfg = coordinator_options(
        federation=fed, task=task, broker=broker, rounds=rounds, seed=seed, state_dir=work / "coord",
        evaluation_data=work / "test.npz", publish_onnx=False, plan=plan,
        round={"devices_per_round": per_round, "min_updates": max(1, -(-per_round // 2)),
               "over_selection": over_selection, "deadline_s": 120.0, "wait_for_devices_s": 120.0,
               "min_devices": per_round})
    cfg = merge_tables(merge_tables(cfg, overrides), extra)
    configs = {}
    for i, (x, y) in enumerate(dataset.parts):
        save_npz_atomic(work / f"dev{i}.npz", x, y)
        configs[f"device-{i:02d}"] = edge_options(device_id=f"device-{i:02d}", federation=fed, task=task,
                                                  broker=broker, data=work / f"dev{i}.npz",
                                                  state_dir=work / f"dev{i}", seed=seed + i, holdout_fraction=holdout)
    with Federation.create(work, broker, coordinator=cfg, devices=configs, devices_in="threads") as federation:
        federation.devices.start_all()
        started = time.monotonic()
        result = run_coordinator(build_coordinator(federation.files.coordinator, environ={}))
        # The devices stop before the bus is read: what they took after the last round counts.
        federation.devices.close()
        stats = dict(get_bus(broker.url.removeprefix("memory://")).stats)
    acc = [r.test_accuracy for r in result.records]
    return {
        "case": case, "data": dataset.name, "partition": partition, "devices": devices, "per_round": per_round,
        "rounds": rounds, "over_selection": over_selection, "holdout": holdout, "seed": seed,
        "final_accuracy": acc[-1], "best_accuracy": max(a for a in acc if a is not None),
        "first_round_95": next((r.round for r in result.records if (r.test_accuracy or 0) >= 0.95), None),
        "first_round_96": next((r.round for r in result.records if (r.test_accuracy or 0) >= 0.96), None),
        "accuracy_per_round": acc,
        "devices_bytes_down": sum(stats[(d, "bytes_out")] for d in configs),
        "devices_bytes_up": sum(stats[(d, "bytes_in")] for d in configs),
        "coordinator_bytes_out": stats[(f"fedmq-coordinator-{fed}", "bytes_in")],
        "updates_accepted": sum(r.accepted for r in result.records),
        "wall_seconds": round(time.monotonic() - started, 1),
    }


def parse_setting(text: str) -> dict[str, Any]:
    """``"a.b=1.5"`` -> ``{"a": {"b": 1.5}}`` (the value as JSON, else the string itself)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set wants SECTION.KEY=VALUE, got {text!r}")
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    out: dict[str, Any] = {}
    node = out
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return out


def summarize(case: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean / median / minimum of the final and best accuracy over seeds, and the median round
    at which 95% is first reached (None counts as never)."""
    finals = sorted(r["final_accuracy"] for r in runs)
    bests = [r["best_accuracy"] for r in runs]
    never = 10**9
    r95 = statistics.median(r["first_round_95"] or never for r in runs)
    return {"summary": case, "seeds": [r["seed"] for r in runs], "final_mean": statistics.fmean(finals),
            "final_median": statistics.median(finals), "final_min": finals[0], "best_mean": statistics.fmean(bests),
            "round_95_median": None if r95 >= never else r95,
            "devices_bytes_down_mean": statistics.fmean(r["devices_bytes_down"] for r in runs),
            "devices_bytes_up_mean": statistics.fmean(r["devices_bytes_up"] for r in runs)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", action="append", choices=sorted(CASES), required=True)
    ap.add_argument("--data", default="digits", choices=["digits", "mnist"])
    ap.add_argument("--data-dir", type=Path)
    ap.add_argument("--devices", type=int, default=10)
    ap.add_argument("--per-round", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--partition", default="iid", choices=["iid", "dirichlet"])
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, default=1, help="seeds per case, from --seed")
    ap.add_argument("--set", dest="settings", action="append", type=parse_setting, default=[],
                    help="coordinator override SECTION.KEY=VALUE for every case")
    ap.add_argument("--over-selection", type=float, default=1.0)
    ap.add_argument("--holdout", type=float, default=0.0)
    args = ap.parse_args(argv)
    extra: dict[str, Any] = {}
    for setting in args.settings:
        extra = merge_tables(extra, setting)
    for case in args.case:
        runs = []
        for seed in range(args.seed, args.seed + args.seeds):
            with tempfile.TemporaryDirectory(prefix=f"fedmq-downlink-{case}-") as tmp:
                out = run_case(case, data=args.data, data_dir=args.data_dir, devices=args.devices,
                               per_round=args.per_round, rounds=args.rounds, partition=args.partition,
                               alpha=args.alpha, seed=seed, over_selection=args.over_selection,
                               holdout=args.holdout, work=Path(tmp), extra=extra)
            out["settings"] = extra
            print(json.dumps(out), flush=True)
            runs.append(out)
        if args.seeds > 1:
            print(json.dumps(summarize(case, runs)), flush=True)


if __name__ == "__main__":
    main()
