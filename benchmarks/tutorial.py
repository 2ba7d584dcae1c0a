"""The classic tutorial set-up: federated multinomial logistic regression on MNIST.

A published tutorial trained a logistic regression over 10 IID clients of 6,000 full-MNIST
images each, every client taking part in every round, 4 local SGD steps of batch 32 at
lr 0.1 per round, for 100 rounds, and reached 91.59% test accuracy. Here the same
procedure runs on the MNIST-10k split of ../shared/data/README.md (task ``mnist-logreg``,
10 IID devices of 800 images, test on the split's 2,000), so expect somewhat less.

Runs: dense float32 (codec ``none``) against Top-K + int8 with error feedback at 1% and
10% density. The logistic regression's weight (7,840 entries) is Top-K coded; its bias
(10 entries, below ``dense_below``) goes dense int8.

Like :mod:`benchmarks.learning`, the rounds run in one process with the services' own
code: the real coordinator and edge agents in one process (:mod:`benchmarks.simulation`). The whole set-up is cheap, so the quick suite runs it
unreduced.

Run alone: ``python -m benchmarks.tutorial [--smoke]`` prints the JSON result.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch

from benchmarks.learning import EXECUTION
from benchmarks.simulation import FedSetup, simulate, with_codec
from fedmq.wire.messages import TrainPlan

#: Test accuracy of the published tutorial (full MNIST, 6,000 images per client).
REFERENCE_ACCURACY = 0.9159

PLAN = TrainPlan(update_kind="delta", local_steps=4, local_epochs=0, batch_size=32, lr=0.1)

#: name -> (codec, density, error feedback, label)
RUNS: dict[str, tuple[str, float, bool, str]] = {
    "dense": ("none", 1.0, False, "dense float32"),
    "topk1-ef": ("topk-int8", 0.01, True, "Top-K 1% + int8, EF"),
    "topk10-ef": ("topk-int8", 0.10, True, "Top-K 10% + int8, EF"),
}


def setup_for(run: str, rounds: int = 100) -> FedSetup:
    name, density, ef, _ = RUNS[run]
    return FedSetup(task="mnist-logreg", devices=10, per_round=10, rounds=rounds, partition="iid",
                    plan=with_codec(PLAN, name, density, ef), server_optimizer="fedavg", server_lr=1.0, seed=0)


def _run(rounds: int) -> dict[str, Any]:
    results = {run: simulate(setup_for(run, rounds)) for run in RUNS}
    dense_up = results["dense"]["bytes_up"]
    rows = [[RUNS[n][3], round(100 * r["final_accuracy"], 2), round(100 * r["best_accuracy"], 2),
             round(r["bytes_up"] / 1e6, 3), round(r["bytes_down"] / 1e6, 2),
             round(dense_up / r["bytes_up"], 1), round(r["seconds"], 1)] for n, r in results.items()]
    step = max(1, rounds // 10)
    shown = sorted(set(range(step, rounds + 1, step)) | {1, rounds})
    return {
        "runs": results,
        "reference_accuracy": REFERENCE_ACCURACY,
        "execution": "in-process",
        "execution_note": EXECUTION,
        "reduced": False,
        "tables": [
            {"title": f"mnist-logreg, 10 IID devices of 800, all taking part, 4 local steps (batch 32, lr 0.1), "
                      f"{rounds} rounds",
             "columns": ["run", "final acc %", "best acc %", "MB up", "MB down", "uplink ratio vs dense", "seconds"],
             "rows": rows},
            {"title": "Test accuracy (%) by round", "columns": ["round"] + list(results),
             "rows": [[r] + [round(100 * res["history"][r - 1]["accuracy"], 2) for res in results.values()]
                      for r in shown]},
        ],
        "notes": [f"Reference: {100 * REFERENCE_ACCURACY:.2f}% in a published tutorial with full MNIST "
                  f"(6,000 images per client); MNIST-10k has 800 per client.",
                  f"Execution: {EXECUTION}."],
    }


def run(quick: bool) -> dict[str, Any]:
    """The tutorial suite: 100 rounds in both modes (it takes well under a minute)."""
    return _run(100)


def smoke() -> dict[str, Any]:
    """Three rounds: keeps the harness honest, figures not meaningful."""
    out = _run(3)
    out["reduced"] = True
    out["notes"].append("Smoke case: 3 rounds, figures are not meaningful.")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tutorial", description="tutorial benchmark")
    p.add_argument("--smoke", action="store_true", help="three rounds only")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    result = smoke() if args.smoke else run(quick=True)
    print(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
