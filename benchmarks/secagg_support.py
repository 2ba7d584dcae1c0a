"""Where a secure round loses against plain aggregation (issue #26): the MNIST CNN over the
in-memory bus (4 device threads of 500 samples, 4 rounds, 1,000 test samples), every device's
secure input (residual plus update, float32 ``(size,)``) recorded and compared, round by
round, with the secure mean the coordinator stepped by.

Printed per round: the secure mean's cosine to the plain (dense) mean of the same inputs and to
that mean restricted to the support (the ring's own loss), client Top-K's cosine at the same
count, the share of the inputs' energy on the support, and the largest |value| against
``clip``; then the test accuracy per round. Instruments the coordinator by wrapping
``coordinator.secure.closed_round`` and ``edge_client.secure.SecureDevice.provide`` (a
diagnostic, not a product path)::

    python -m benchmarks.secagg_support                     plain rounds
    python -m benchmarks.secagg_support secure              ranking "change" (the default)
    python -m benchmarks.secagg_support secure '{"ranking": "gradient"}'
    python -m benchmarks.secagg_support secure '{"ranking": "gradient"}' '{"density": 0.03}'

The third argument changes the demo's settings (fleet.demo.DemoSettings: density, rounds, ...).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def main(argv: list[str]) -> None:
    from rich.console import Console

    import coordinator.secure as cs
    import edge_client.secure as es
    from fedmq.data import shared_data_dir
    from fleet.demo import DemoSettings, run_demo

    secure = bool(argv) and argv[0] == "secure"
    table: dict[str, Any] = json.loads(argv[1]) if len(argv) > 1 else {}
    overrides: dict[str, Any] = json.loads(argv[2]) if len(argv) > 2 else {}
    inputs: dict[int, dict[str, np.ndarray]] = {}
    provide, closed_round = es.SecureDevice.provide, cs.closed_round

    def recorded(self: es.SecureDevice, round_: int, vector: np.ndarray) -> None:
        inputs.setdefault(round_, {})[self.device] = np.array(vector, dtype=np.float32)
        provide(self, round_, vector)

    def compared(closed, outcome, *, kind, size, min_updates):  # noqa: ANN001, ANN202 - closed_round's
        mean, given = outcome.mean_delta(size), inputs.get(outcome.round, {})
        if mean is not None and given:
            vs = [given[d] for d in outcome.survivors]
            dense = np.mean(vs, axis=0)
            on = np.zeros_like(dense)
            on[outcome.support] = dense[outcome.support]
            k = outcome.support.size
            topk = np.zeros_like(dense)
            for v in vs:
                idx = np.argpartition(-np.abs(v), k)[:k]
                topk[idx] += v[idx] / len(vs)
            print(f"round {outcome.round}: k {k}, cos(secure, plain) {_cos(mean, dense):.3f}, cos(secure, plain on "
                  f"support) {_cos(mean, on):.3f}, cos(client top-k, plain) {_cos(topk, dense):.3f}, energy on "
                  f"support {np.linalg.norm(on) ** 2 / np.linalg.norm(dense) ** 2:.3f}, max |value| "
                  f"{max(float(np.abs(v).max()) for v in vs):.3g}", flush=True)
        return closed_round(closed, outcome, kind=kind, size=size, min_updates=min_updates)

    es.SecureDevice.provide = recorded  # type: ignore[method-assign]
    cs.closed_round = compared  # type: ignore[assignment]
    with tempfile.TemporaryDirectory(prefix="fedmq-secagg-support-") as tmp:
        settings = {"devices": 4, "per_round": 4, "rounds": 4, "data": "mnist",
                    "data_dir": shared_data_dir() / "mnist-t10k", "broker": "memory", "devices_in": "threads",
                    "samples_per_device": 500, "test_samples": 1000, "write_files": False, "publish_onnx": False,
                    "secure_aggregation": (table or True) if secure else False, "out": Path(tmp) / "demo"}
        summary = run_demo(DemoSettings(**{**settings, **overrides}), console=Console(quiet=True))
    print("test accuracy:", summary["initial_accuracy"], "->", summary["accuracy_per_round"])


if __name__ == "__main__":
    main(sys.argv[1:])
