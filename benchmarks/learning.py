"""Learning parity: does Top-K + int8 with error feedback learn as well as dense FedAvg?

Set-up (issue 8): the MNIST CNN of McMahan et al. 2017 (task ``mnist-cnn``) on the
MNIST-10k split of ../shared/data/README.md, 10 devices, 5 selected per round (seeded,
the same devices in every run compared), 1 local epoch of SGD (batch 32, lr 0.05),
FedAvg (server learning rate 1), 30 rounds, IID and Dirichlet(0.5) partitions. Runs:

- ``dense``: codec ``none`` (float32), the FedAvg baseline;
- ``topk1-ef``: Top-K 1% per tensor + int8, with error feedback;
- ``topk01-ef``: Top-K 0.1% + int8, with error feedback;
- ``topk1-noef``: Top-K 1% + int8, without error feedback (ablation).

Reported per run: final and best test accuracy (2,000 test images), the first round
reaching 95%, total bytes up (client-update envelopes) and down (model blob + task per
selected device). Target: ``topk1-ef`` within 1 percentage point of ``dense``.

The rounds run in one process with the real coordinator and real edge agents over the
in-memory bus (:mod:`benchmarks.simulation`); :func:`broker_run` (the harness's ``broker``
suite) runs ``fedmq demo`` (a real broker and separate processes, the product's default
scheduling) against the in-process run of the same settings.

The quick suite runs a reduced matrix (:data:`QUICK`): IID only, ``dense`` against
``topk1-ef``, fewer rounds; it says so in its result (``reduced``).

Run alone: ``python -m benchmarks.learning [--full | --smoke | --broker [--full]]`` prints
the JSON result.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.simulation import FedSetup, simulate, with_codec
from fedmq.wire.messages import TrainPlan

#: Test accuracy whose first round is reported.
TARGET = 0.95

BASE_PLAN = TrainPlan(update_kind="delta", local_steps=0, local_epochs=1, batch_size=32, lr=0.05)

#: name -> (codec, density, error feedback, label)
RUNS: dict[str, tuple[str, float, bool, str]] = {
    "dense": ("none", 1.0, False, "dense float32 FedAvg"),
    "topk1-ef": ("topk-int8", 0.01, True, "Top-K 1% + int8, EF"),
    "topk01-ef": ("topk-int8", 0.001, True, "Top-K 0.1% + int8, EF"),
    "topk1-noef": ("topk-int8", 0.01, False, "Top-K 1% + int8, no EF"),
}

FULL = {"rounds": 30, "partitions": ("iid", "dirichlet"), "runs": tuple(RUNS)}
#: The quick suite's reduction: fits, with the other suites, in about 10 minutes on 2 cores.
QUICK = {"rounds": 15, "partitions": ("iid",), "runs": ("dense", "topk1-ef")}
SMOKE = {"rounds": 2, "partitions": ("iid",), "runs": ("dense", "topk1-ef"), "devices": 3, "per_round": 2,
         "samples_per_device": 64, "test_samples": 256}

EXECUTION = ("in-process: the real coordinator and one real edge agent per device (threads) over the "
             "in-memory bus (memory://); every device online before round 1, no over-selection, rounds wait "
             "for every selected device, no local hold-out")


def setup_for(run: str, partition: str, rounds: int, **overrides: Any) -> FedSetup:
    """The FedSetup of one run of the matrix."""
    name, density, ef, _ = RUNS[run]
    return FedSetup(task="mnist-cnn", devices=overrides.get("devices", 10), per_round=overrides.get("per_round", 5),
                    rounds=rounds, partition=partition, alpha=0.5,
                    plan=with_codec(BASE_PLAN, name, density, ef), server_optimizer="fedavg", server_lr=1.0,
                    seed=0, samples_per_device=overrides.get("samples_per_device"),
                    test_samples=overrides.get("test_samples"))


def _pct(v: float | None) -> float | None:
    return None if v is None else round(100.0 * v, 2)


def run_matrix(spec: dict[str, Any], log=None) -> dict[str, Any]:
    """Run every (partition, run) of ``spec`` and tabulate; see the module docstring."""
    overrides = {k: spec[k] for k in ("devices", "per_round", "samples_per_device", "test_samples") if k in spec}
    results: dict[str, dict[str, Any]] = {}
    for partition in spec["partitions"]:
        for run in spec["runs"]:
            setup = setup_for(run, partition, spec["rounds"], **overrides)
            r = simulate(setup, target_accuracy=TARGET)
            results[f"{partition}/{run}"] = {"partition": partition, "run": run, **r}
            if log:
                log(f"[learning] {partition}/{run}: final {_pct(r['final_accuracy'])}% "
                    f"best {_pct(r['best_accuracy'])}% up {r['bytes_up']:,} B in {r['seconds']:.0f} s")
    rows, parity, curves = [], [], {}
    for key, r in results.items():
        dense = results.get(f"{r['partition']}/dense")
        ratio = dense["bytes_up"] / r["bytes_up"] if dense and r["bytes_up"] else None
        rows.append([r["partition"], RUNS[r["run"]][3], _pct(r["final_accuracy"]), _pct(r["best_accuracy"]),
                     r["rounds_to_target"], round(r["bytes_up"] / 1e6, 3), round(r["bytes_down"] / 1e6, 1),
                     None if ratio is None else round(ratio, 1), round(r["seconds"], 1)])
        curves[key] = [round(100 * h["accuracy"], 2) for h in r["history"]]
    for partition in spec["partitions"]:
        dense, ef = results.get(f"{partition}/dense"), results.get(f"{partition}/topk1-ef")
        if dense and ef:
            gap = 100.0 * (dense["final_accuracy"] - ef["final_accuracy"])
            gap_best = 100.0 * (dense["best_accuracy"] - ef["best_accuracy"])
            parity.append({"partition": partition, "dense_final_pct": _pct(dense["final_accuracy"]),
                           "topk1_ef_final_pct": _pct(ef["final_accuracy"]), "gap_pp": round(gap, 2),
                           "gap_best_pp": round(gap_best, 2), "within_1pp": gap <= 1.0})
    step = max(1, spec["rounds"] // 10)
    shown = sorted(set(range(step, spec["rounds"] + 1, step)) | {1, spec["rounds"]})
    curve_table = {"title": "Test accuracy (%) by round", "columns": ["round"] + list(curves),
                   "rows": [[r] + [c[r - 1] if r <= len(c) else None for c in curves.values()] for r in shown]}
    for r in results.values():
        for h in r["history"]:
            h["selected"] = ",".join(h["selected"])
    return {
        "runs": results,
        "parity": parity,
        "tables": [
            {"title": f"McMahan CNN, {spec.get('devices', 10)} devices, {spec.get('per_round', 5)} per round, "
                      f"{spec['rounds']} rounds", "columns":
                ["partition", "run", "final acc %", "best acc %", f"rounds to {int(TARGET * 100)}%", "MB up",
                 "MB down", "uplink ratio vs dense", "seconds"], "rows": rows},
            {"title": "Parity target: Top-K 1% + EF within 1 pp of dense (final accuracy)",
             "columns": ["partition", "dense %", "Top-K 1% EF %", "gap pp (final)", "gap pp (best)", "within 1 pp"],
             "rows": [[p["partition"], p["dense_final_pct"], p["topk1_ef_final_pct"], p["gap_pp"], p["gap_best_pp"],
                       p["within_1pp"]] for p in parity]},
            curve_table,
        ],
    }


def run(quick: bool) -> dict[str, Any]:
    """The learning-parity suite: the full matrix, or with ``quick`` the reduced :data:`QUICK`."""
    spec = QUICK if quick else FULL
    out = run_matrix(spec, log=_log)
    out.update(execution="in-process", execution_note=EXECUTION, reduced=quick, matrix=_describe(spec))
    notes = [f"Execution: {EXECUTION}. `fedmq demo` is the configuration that runs through the real broker."]
    if quick:
        notes.append(f"Quick suite: REDUCED matrix ({_describe(spec)}); the full suite runs "
                     f"{_describe(FULL)}.")
    notes.append("Through the real broker and processes: see the `broker` suite (`fedmq demo`).")
    out["notes"] = notes
    return out


def smoke() -> dict[str, Any]:
    """The smallest case (3 devices, 2 per round, 2 rounds, 64 samples each): keeps the harness honest."""
    out = run_matrix(SMOKE)
    out.update(execution="in-process", execution_note=EXECUTION, reduced=True, matrix=_describe(SMOKE))
    out["notes"] = ["Smoke case: tiny parameterisation, figures are not meaningful."]
    return out


def _describe(spec: dict[str, Any]) -> str:
    extra = "".join(f", {k}={spec[k]}" for k in ("devices", "per_round", "samples_per_device", "test_samples")
                    if k in spec)
    return f"{spec['rounds']} rounds, partitions {'+'.join(spec['partitions'])}, runs {'+'.join(spec['runs'])}{extra}"


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- through the broker

#: Federations run through the real broker by ``fedmq demo`` and, with the same settings,
#: in process. ``digits``: the demo's default data (cheap: every suite mode runs it);
#: ``mnist``: the learning suite's CNN on MNIST-10k (full suite only).
BROKER_CASES: dict[str, dict[str, Any]] = {
    "digits": {"data": "digits", "task": "digits-mlp", "devices": 4, "per_round": 2, "rounds": 10},
    "mnist": {"data": "mnist", "task": "mnist-cnn", "devices": 10, "per_round": 5, "rounds": 5},
}
BROKER_CODEC = ("topk-int8", 0.01)


def broker_case(name: str, timeout_s: float = 540.0) -> dict[str, Any]:
    """Run ``fedmq demo`` for one case of :data:`BROKER_CASES` (embedded broker; coordinator
    and one process per edge client), then the in-process simulation with the same task,
    data, partition, plan, codec and seed; compare final accuracy and bytes up.

    Known differences, by design of the services: the demo over-selects (1.3x) and closes a
    round with the first updates to arrive, so its participants need not be the simulation's;
    it has deadlines and can reject late updates; its bytes up are the blob bytes received
    (manifests included, rejected updates included), the simulation's the envelopes accepted.

    Raises:
        FedmqError: the demo failed, ran past ``timeout_s`` or wrote no summary.json.
    """
    from fleet.demo import DEMO_PLANS
    from fedmq.data import MNIST_T10K_DIR, shared_data_dir
    from fedmq.errors import FedmqError

    case = BROKER_CASES[name]
    codec_name, density = BROKER_CODEC
    out_dir = Path(os.environ.get("FEDMQ_BENCH_OUT") or tempfile.mkdtemp(prefix="fedmq-bench-")) / f"demo-{name}"
    cmd = [sys.executable, "-m", "fedmq.cli", "demo", "--devices", str(case["devices"]),
           "--per-round", str(case["per_round"]), "--rounds", str(case["rounds"]), "--codec", codec_name,
           "--density", str(density), "--data", case["data"], "--task", case["task"], "--seed", "0",
           "--out", str(out_dir)]
    if case["data"] == "mnist":
        cmd += ["--data-dir", str(shared_data_dir() / MNIST_T10K_DIR)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise FedmqError(f"`{' '.join(cmd)}` ran past {timeout_s:.0f} s (device logs in {out_dir}/devices)") from None
    demo_seconds = time.perf_counter() - t0
    summary_path = out_dir / "summary.json"
    if proc.returncode != 0 or not summary_path.is_file():
        raise FedmqError(f"`{' '.join(cmd)}` exited {proc.returncode} without {summary_path}; "
                         f"output tail: {(proc.stdout + proc.stderr)[-1500:]}")
    demo = json.loads(summary_path.read_text(encoding="utf-8"))

    plan = TrainPlan(update_kind="delta", local_steps=0, **DEMO_PLANS[case["data"]])
    setup = FedSetup(task=case["task"], devices=case["devices"], per_round=case["per_round"], rounds=case["rounds"],
                     partition="iid", plan=with_codec(plan, codec_name, density, True), seed=0)
    sim = simulate(setup)
    return {
        "case": name, "settings": setup.describe(), "command": " ".join(cmd), "demo_seconds": demo_seconds,
        "demo": demo,
        "in_process": {k: sim[k] for k in ("final_accuracy", "best_accuracy", "bytes_up", "bytes_down",
                                           "seconds")}
                      | {"accuracy_per_round": [h["accuracy"] for h in sim["history"]]},
        "row": [name, case["task"], f"{case['devices']}/{case['per_round']}/{case['rounds']}",
                _pct(demo.get("final_accuracy")), _pct(sim["final_accuracy"]),
                demo.get("bytes_up_total"), sim["bytes_up"],
                _per_update(demo.get("bytes_up_total"), (demo.get("updates_accepted") or 0)
                            + (demo.get("updates_rejected") or 0)),
                _per_update(sim["bytes_up"], case["rounds"] * case["per_round"]),
                demo.get("updates_accepted"), demo.get("updates_rejected"), demo.get("rounds_failed"),
                round(demo_seconds, 1), round(sim["seconds"], 1)],
    }


def _per_update(total: int | None, count: int) -> int | None:
    return None if total is None or count <= 0 else round(total / count)


def broker_run(quick: bool) -> dict[str, Any]:
    """The ``broker`` suite: the small ``digits`` case always, the ``mnist`` CNN case in the
    full suite. A case that fails is recorded (``errors``) and the other still runs."""
    cases = ["digits"] if quick else ["digits", "mnist"]
    results, errors = {}, {}
    for name in cases:
        try:
            results[name] = broker_case(name)
        except Exception as exc:  # one broken case must not hide the other's figures
            errors[name] = f"{type(exc).__name__}: {exc}"
    if not results:
        raise RuntimeError("every through-the-broker case failed: "
                           + "; ".join(f"{k}: {v}" for k, v in errors.items()))
    notes = ["`demo` = `fedmq demo`: embedded amqtt broker, coordinator, one process per edge client; "
             "`in-process` = the simulation of the learning suites with the same task, data, partition, plan, "
             "codec (Top-K 1% + int8 + EF) and seed.",
             "Expected differences: the demo over-selects 1.3x and closes a round with the first updates to "
             "arrive (other participants than the simulation's seeded sample), has deadlines and may reject "
             "late updates; its bytes up are every received blob (manifests included), the simulation's the "
             "accepted envelopes."]
    notes += [f"case {k} FAILED: {v}" for k, v in errors.items()]
    return {
        "cases": results, "errors": errors, "notes": notes,
        "tables": [{"title": "Through the broker (`fedmq demo`) against in-process, same settings",
                    "columns": ["case", "task", "devices/per round/rounds", "demo final acc %",
                                "in-process final acc %", "demo bytes up", "in-process bytes up",
                                "demo B per update received", "in-process B per update",
                                "demo updates accepted", "demo updates rejected", "demo rounds failed",
                                "demo seconds", "in-process seconds"],
                    "rows": [r["row"] for r in results.values()]}],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.learning", description="learning-parity benchmark")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--full", action="store_true", help="the full matrix (default: quick)")
    g.add_argument("--smoke", action="store_true", help="the smallest case")
    p.add_argument("--broker", action="store_true", help="the through-the-broker suite instead")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.broker:
        result = broker_run(quick=not args.full)
    else:
        result = smoke() if args.smoke else run(quick=not args.full)
    print(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
