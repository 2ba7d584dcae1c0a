"""Privacy: final accuracy against epsilon, through mosquitto with ``fedmq fleet``.

For each task, codec setting (``CODECS``; the defaults: Top-K + int8 + error feedback up,
and down without DP, a dense downlink under DP; or dense float32 both ways) and privacy
level (no DP unless ``--no-baseline``, then target epsilon in ``--epsilons`` at delta
1e-5), one run of ``fedmq fleet run --coordinator`` (virtual devices running the unchanged
edge agent, in a few worker processes, and the real coordinator) against one mosquitto:
``--devices`` devices, Poisson sampling at rate ``per_round / devices``, ``--rounds`` rounds;
the noise multiplier is calibrated by dp-accounting for the target over those rounds, the
coordinator adds N(0, sigma^2 C^2) to the sum of clipped updates and divides by the expected
``per_round``. Reported: final test accuracy, the epsilon actually spent (the ledger), sigma,
the noise on the mean (sigma C / m per coordinate), client-update bytes up and the bytes the
devices received (model, tasks, receipts).

    python -m benchmarks.privacy                                    # 200 devices, 20 per round, digits-logreg
    python -m benchmarks.privacy --devices 1000 --per-round 100 --tasks digits-logreg,mnist-cnn --processes 4

Also a suite of ``python -m benchmarks run`` (quick: the reduced size above).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from fedmq.privacy.accountant import calibrate_sigma
from fedmq.tasks.builtin import MNIST_PLAN
from fleet.fleet import min_processes, raise_nofile
from fleet.launch import Broker, child_env, coordinator_options, start_broker, write_toml

DELTA = 1e-5
#: task -> (fleet data, local samples per device, local training plan, evaluation data, clip norm C).
TASKS: dict[str, tuple[str, int, dict[str, Any], str, float]] = {
    "digits-logreg": ("digits", 32, {"local_epochs": 5, "lr": 0.3, "batch_size": 16}, "digits", 1.0),
    "mnist-cnn": ("mnist10k", 160, dict(MNIST_PLAN), "mnist10k", 1.0),
}
CODECS = {
    # the coordinator's defaults: Top-K + int8 + error feedback up; down the same without DP,
    # dense under DP (coordinator.config: a Top-K of a noisy global step keeps mostly noise)
    "defaults": ({}, {}),
    # the defaults' uplink with the compressed downlink named (what DP runs used before 0.3)
    "compressed-downlink": ({}, {"codec": "topk-int8"}),
    # the compressed downlink at ten times the default density (does more of the step survive?)
    "downlink-density-0.1": ({}, {"codec": "topk-int8", "density": 0.1}),
    "dense": ({"codec": "none", "error_feedback": False}, {"codec": "none"}),
    # the defaults' uplink with a dense downlink (under DP: a Top-K of a noisy global step)
    "dense-downlink": ({}, {"codec": "none"}),
}


def run_name(task: str, codec: str, epsilon: float | None) -> str:
    """The folder (under the benchmark's work folder) and federation name of one run."""
    return f"{task}-{codec}-{'nodp' if epsilon is None else f'eps{epsilon:g}'}"


def one_run(work: Path, broker: Broker, *, task: str, codec: str, epsilon: float | None, devices: int, per_round: int,
            rounds: int, processes: int, clip: float | None = None, seed: int = 0) -> dict[str, Any]:
    """One federation through ``fedmq fleet`` (module docstring); its row."""
    data, samples, plan, eval_data, default_clip = TASKS[task]
    clip = clip or default_clip
    processes = max(processes, min_processes(devices))
    plan_extra, downlink = CODECS[codec]
    name = run_name(task, codec, epsilon)
    fed = name.replace(".", "_")
    folder = work / name
    rate = per_round / devices
    privacy: dict[str, Any] = {}
    sigma = None
    if epsilon is not None:
        sigma = calibrate_sigma(epsilon, DELTA, rounds, "poisson", rate=rate)
        privacy = {"enabled": True, "clip_norm": clip, "noise_multiplier": sigma, "target_epsilon": epsilon,
                   "delta": DELTA, "sampling": "poisson", "sampling_rate": rate, "rounds": rounds}
    coord = write_toml(folder / "coordinator.toml", coordinator_options(
        federation=fed, task=task, broker=broker, rounds=rounds, seed=seed, state_dir=folder / "state",
        evaluation_data=eval_data, publish_onnx=False,
        round={"devices_per_round": per_round, "min_updates": max(1, per_round // 4), "deadline_s": 60.0,
               "min_devices": devices, "wait_for_devices_s": 120.0},
        plan={**plan, **plan_extra}, downlink=downlink, **({"privacy": privacy} if privacy else {})))
    fleet = write_toml(folder / "fleet.toml", {
        "broker_url": broker.url, "federation": fed, "task": task, "devices": devices, "processes": processes,
        "data": data, "samples_per_device": samples, "seed": seed, "work_dir": str(folder / "fleet")})
    with open(folder / "fleet.log", "w") as log:
        proc = subprocess.run([sys.executable, "-m", "fedmq.cli", "fleet", "run", "-c", str(fleet), "--coordinator",
                               str(coord), "--connect-timeout", str(120 + devices / 10)],
                              env=child_env(), stdout=log, stderr=subprocess.STDOUT, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"fedmq fleet exited {proc.returncode}; see {folder / 'fleet.log'}")
    summary = json.loads((folder / "fleet" / "summary.json").read_text())
    recs = summary.get("rounds", [])
    accs = [r["test_accuracy"] for r in recs if r.get("test_accuracy") is not None]
    dp = summary.get("privacy") or {}
    return {
        "task": task, "codec": codec, "target_epsilon": epsilon, "epsilon": dp.get("epsilon"),
        "sigma": None if sigma is None else round(sigma, 4), "clip_norm": clip if epsilon is not None else None,
        "noise_on_mean": None if sigma is None else round(sigma * clip / per_round, 5),
        "devices": devices, "per_round": per_round, "rounds": len(recs),
        "accepted": sum(r["accepted"] for r in recs),
        "final_accuracy": round(accs[-1], 4) if accs else None,
        "best_accuracy": round(max(accs), 4) if accs else None,
        "bytes_up": sum(r["bytes_up"] for r in recs), "bytes_down": sum(r["bytes_down"] for r in recs),
        "rejected": sum(r["rejected_total"] for r in recs),
    }


def run(quick: bool = True, *, devices: int | None = None, per_round: int | None = None, rounds: int | None = None,
        tasks: list[str] | None = None, codecs: list[str] | None = None, epsilons: list[float] | None = None,
        processes: int = 2, clip: float | None = None, baseline: bool = True) -> dict[str, Any]:
    """The suite's entry point (benchmarks.harness); the reduced size unless told otherwise."""
    devices = devices or (200 if quick else 1000)
    per_round = per_round or max(1, devices // 10)
    rounds = rounds or (20 if quick else 50)
    tasks = tasks or (["digits-logreg"] if quick else ["digits-logreg", "mnist-cnn"])
    codecs = codecs or ["defaults", "dense"]
    targets = epsilons if epsilons is not None else [8.0, 3.0, 1.0]
    levels: list[float | None] = [*([None] if baseline else []), *targets]
    raise_nofile(devices + 2048)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedmq-privacy-") as tmp:
        work = Path(tmp)
        broker = start_broker("mosquitto", work, mosquitto_conf="max_connections -1")
        try:
            for task in tasks:
                for codec in codecs:
                    for eps in levels:
                        try:
                            row = one_run(work, broker, task=task, codec=codec, epsilon=eps, devices=devices,
                                          per_round=per_round, rounds=rounds, processes=processes, clip=clip)
                        except (RuntimeError, subprocess.TimeoutExpired) as exc:
                            # The log lives in the temporary folder: show its end before it goes.
                            log = work / run_name(task, codec, eps) / "fleet.log"
                            tail = log.read_text(errors="replace")[-4000:] if log.exists() else "(no log)"
                            print(f"run {run_name(task, codec, eps)} failed: {exc}\n{tail}", file=sys.stderr,
                                  flush=True)
                            continue
                        # A finished run's folder (this benchmark's own) goes at once: with a dense
                        # downlink each of 1,000 CNN devices keeps the 6.6 MB model on disk.
                        shutil.rmtree(work / run_name(task, codec, eps))
                        print(json.dumps(row), flush=True)
                        rows.append(row)
        finally:
            broker.close()
    cols = ["task", "codec", "target_epsilon", "epsilon", "sigma", "clip_norm", "noise_on_mean", "rounds",
            "accepted", "final_accuracy", "best_accuracy", "bytes_up", "bytes_down"]
    return {"runs": rows, "tables": [{"title": f"Accuracy against epsilon (delta {DELTA:g}), {devices} devices, "
                                               f"{per_round} per round (Poisson), {rounds} rounds, through mosquitto",
                                      "columns": cols, "rows": [[r[c] for c in cols] for r in rows]}],
            "notes": ["epsilon: spent by the ledger (RDP, dp-accounting); sigma calibrated for the target over the "
                      "rounds; noise_on_mean = sigma C / m per coordinate; bytes_down: what the devices received"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.privacy", description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=200)
    p.add_argument("--per-round", type=int, default=0, help="devices per round (default: devices / 10)")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--tasks", default="digits-logreg", help=f"comma-separated: {', '.join(TASKS)}")
    p.add_argument("--codecs", default="defaults,dense", help=f"comma-separated: {', '.join(CODECS)}")
    p.add_argument("--epsilons", default="8,3,1", help="comma-separated target epsilons (\"\": none)")
    p.add_argument("--clip", type=float, default=0.0, help="clip norm C (0: the task's default)")
    p.add_argument("--processes", type=int, default=2, help="fleet worker processes")
    p.add_argument("--no-baseline", action="store_true", help="skip the runs without DP")
    p.add_argument("--out", default="", help="write the result as JSON there")
    a = p.parse_args(argv)
    res = run(False, devices=a.devices, per_round=a.per_round or None, rounds=a.rounds,
              tasks=a.tasks.split(","), codecs=a.codecs.split(","),
              epsilons=[float(e) for e in a.epsilons.split(",") if e], processes=a.processes, clip=a.clip or None,
              baseline=not a.no_baseline)
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
