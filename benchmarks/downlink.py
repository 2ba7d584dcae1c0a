"""Compressed downlink against dense: accuracy and bytes both ways, one process, in-memory bus.

The real coordinator (:class:`coordinator.service.Coordinator`) and real edge agents
(:class:`edge_client.agent.EdgeAgent`, one thread each) on the in-memory bus (``memory://``),
with the demo's data, partitions and training plans (fleet/demo.py). Bytes are the bus's own
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
import secrets
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from coordinator.config import config_from_dict
from coordinator.service import Coordinator
from edge_client.agent import EdgeAgent
from edge_client.config import EdgeConfig
from fedmq.data import save_npz_atomic
from fedmq.transport.memory import get_bus
from fleet.demo import DEFAULT_TASKS, DEMO_PLANS, load_demo_data

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


def _merge(into: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def run_case(case: str, *, data: str, data_dir: Path | None, devices: int, per_round: int, rounds: int,
             partition: str, alpha: float, seed: int, over_selection: float, holdout: float,
             work: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """One federation; returns accuracy per round and the bus's byte counts. ``extra``:
    coordinator settings merged over the case's (nested dicts, as in coordinator.toml)."""
    codec, overrides = CASES[case]
    dataset = load_demo_data(data, data_dir, devices, partition, alpha)
    task = DEFAULT_TASKS[data]
    bus_name = f"bench-{secrets.token_hex(4)}"
    url = f"memory://{bus_name}"
    fed = "bench"
    save_npz_atomic(work / "test.npz", dataset.x_test, dataset.y_test)
    plan = dict(DEMO_PLANS["digits" if data == "digits" else "mnist"], codec=codec, density=0.01,
                error_feedback=codec != "none")
    cfg: dict[str, Any] = {
        "federation": fed, "task": task, "rounds": rounds, "seed": seed, "state_dir": str(work / "coord"),
        "broker": {"url": url}, "plan": plan, "evaluation": {"data": str(work / "test.npz")},
        "round": {"devices_per_round": per_round, "min_updates": max(1, -(-per_round // 2)),
                  "over_selection": over_selection, "deadline_s": 120.0, "wait_for_devices_s": 120.0,
                  "min_devices": per_round},
        "publish": {"onnx": False}}
    _merge(cfg, overrides)
    _merge(cfg, extra or {})
    agents, threads, stops = [], [], []
    for i, (x, y) in enumerate(dataset.parts):
        save_npz_atomic(work / f"dev{i}.npz", x, y)
        agent = EdgeAgent(EdgeConfig(broker={"url": url}, device_id=f"device-{i:02d}", federation=fed, task=task,
                                     data=work / f"dev{i}.npz", state_dir=work / f"dev{i}", seed=seed + i,
                                     holdout_fraction=holdout))
        stop = threading.Event()
        thread = threading.Thread(target=agent.run, args=(stop,), daemon=True)
        thread.start()
        agents.append(agent)
        threads.append(thread)
        stops.append(stop)
    started = time.monotonic()
    try:
        result = Coordinator(config_from_dict(cfg)).run()
    finally:
        for stop in stops:
            stop.set()
        for thread in threads:
            thread.join(timeout=60)
    bus = get_bus(bus_name)
    ids = [a.cfg.device_id for a in agents]
    acc = [r.test_accuracy for r in result.records]
    return {
        "case": case, "data": dataset.name, "partition": partition, "devices": devices, "per_round": per_round,
        "rounds": rounds, "over_selection": over_selection, "holdout": holdout, "seed": seed,
        "final_accuracy": acc[-1], "best_accuracy": max(a for a in acc if a is not None),
        "first_round_95": next((r.round for r in result.records if (r.test_accuracy or 0) >= 0.95), None),
        "first_round_96": next((r.round for r in result.records if (r.test_accuracy or 0) >= 0.96), None),
        "accuracy_per_round": acc,
        "devices_bytes_down": sum(bus.stats[(d, "bytes_out")] for d in ids),
        "devices_bytes_up": sum(bus.stats[(d, "bytes_in")] for d in ids),
        "coordinator_bytes_out": bus.stats[(f"fedmq-coordinator-{fed}", "bytes_in")],
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
        _merge(extra, setting)
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
