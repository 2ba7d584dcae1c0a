"""Codec benchmark: topk-int8 on a real client update of McMahan et al.'s MNIST CNN.

The update is the delta after one local epoch (batch 32, SGD lr 0.05) on device 0's 800
images of the IID partition of the MNIST-10k split (../shared/data/README.md), from the
CNN's seed-0 initialisation. For densities 10%, 1% and 0.1% (and the ``none`` codec, and
1% with per-tensor instead of the default global Top-K selection) it
measures the payload and whole-envelope bytes, the ratio against dense float32
(``4 * size`` bytes), encode / decode times (median of repeats, seconds, one thread) and
the relative L2 error ``||decode(encode(d)) - d|| / ||d||``.

Targets (issue 2): ratio >= 150x at 1% and >= 1000x at 0.1%; encode <= 30 ms and decode
<= 10 ms at 1% on one core.

    python -m benchmarks.codec [--full]     prints the result as JSON
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any, Callable

import numpy as np
import torch

from fedmq.codecs import CodecSpec, decode, decode_sparse, encode
from fedmq.data import mnist10k_partitions, mnist10k_split
from fedmq.wire.envelope import ClientUpdate, encode_update
from fedmq.model.params import ParamSpec, flatten_params
from fedmq.tasks import get_task

DENSITIES = (0.1, 0.01, 0.001)
TARGETS = {"ratio_1pct": 150.0, "ratio_0_1pct": 1000.0, "encode_s_1pct": 0.030, "decode_s_1pct": 0.010}


def real_update(seed: int = 0) -> tuple[np.ndarray, ParamSpec, dict[str, Any]]:
    """The delta of one local epoch of the MNIST CNN on device 0 of 10 (IID), float32 ``(size,)``."""
    task = get_task("mnist-cnn")
    model = task.build_model(seed)
    spec = ParamSpec.from_module(model)
    x_train, y_train, _, _ = mnist10k_split()
    part = mnist10k_partitions(10, "iid")[0]
    x = torch.from_numpy(x_train[part])
    y = torch.from_numpy(y_train[part])
    before = flatten_params(model, spec)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    t0 = time.perf_counter()
    losses = []
    for batch in torch.randperm(len(y), generator=gen).split(32):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    info = {"samples": int(len(y)), "train_seconds": round(time.perf_counter() - t0, 2),
            "first_batch_loss": round(losses[0], 4), "last_batch_loss": round(losses[-1], 4)}
    return flatten_params(model, spec) - before, spec, info


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm caches and allocator
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(delta: np.ndarray, spec: ParamSpec, configs: list[CodecSpec], repeats: int) -> list[dict[str, Any]]:
    """One row per codec configuration."""
    rows = []
    dense_bytes = 4 * spec.size
    norm = float(np.linalg.norm(delta.astype(np.float64)))
    for cfg in configs:
        payload = encode(delta, spec, cfg)
        envelope = encode_update(ClientUpdate(federation="bench", device="dev-0", round=1, base_version=0,
                                              samples=800, kind="delta", spec_hash=spec.hash, codec=cfg.name,
                                              payload=payload, metrics={"train_loss": 0.1}))
        err = decode(cfg.name, payload, spec).astype(np.float64) - delta
        su = decode_sparse(cfg.name, payload, spec)
        kept = delta if su.indices is None else delta[su.indices]
        kept_err = su.values.astype(np.float64) - kept
        rows.append({
            "codec": cfg.name, "density": cfg.params.density if cfg.name != "none" else 1.0,
            "topk": cfg.params.topk if cfg.name != "none" else None,
            "kept": su.nnz, "payload_bytes": len(payload), "envelope_bytes": len(envelope),
            "ratio": round(dense_bytes / len(envelope), 1),
            "bits_per_kept": round(8 * len(payload) / su.nnz, 2),
            "encode_ms": round(1e3 * _median_seconds(lambda: encode(delta, spec, cfg), repeats), 2),
            "decode_ms": round(1e3 * _median_seconds(lambda: decode(cfg.name, payload, spec), repeats), 2),
            "decode_sparse_ms": round(1e3 * _median_seconds(lambda: decode_sparse(cfg.name, payload, spec),
                                                            repeats), 2),
            "rel_l2_error": round(float(np.linalg.norm(err)) / norm, 4),
            "rel_l2_error_kept": round(float(np.linalg.norm(kept_err) / np.linalg.norm(kept)), 4),
            "kept_energy": round(float(np.linalg.norm(kept)) ** 2 / norm**2, 4),
        })
    return rows


def _result(rows: list[dict[str, Any]], spec: ParamSpec, info: dict[str, Any], repeats: int) -> dict[str, Any]:
    by = {r["density"]: r for r in rows if r["codec"] == "topk-int8" and r["topk"] == "global"}
    checks = {}
    if 0.01 in by:
        checks["ratio_1pct"] = by[0.01]["ratio"] >= TARGETS["ratio_1pct"]
        checks["encode_1pct"] = by[0.01]["encode_ms"] <= 1e3 * TARGETS["encode_s_1pct"]
        checks["decode_1pct"] = by[0.01]["decode_ms"] <= 1e3 * TARGETS["decode_s_1pct"]
    if 0.001 in by:
        checks["ratio_0_1pct"] = by[0.001]["ratio"] >= TARGETS["ratio_0_1pct"]
    return {
        "params": spec.size, "dense_float32_bytes": 4 * spec.size, "repeats": repeats,
        "torch_threads": torch.get_num_threads(), **info,
        "rows": rows, "targets_met": checks,
        "notes": ["ratio = 4 * params / envelope bytes (the whole msgpack client update, not only the payload)",
                  "times: median of repeats, one thread; decode = dense float32 vector, "
                  "decode_sparse = validated SparseUpdate for the coordinator's accumulator",
                  "rel_l2_error: against the whole update (Top-K drops most of it; error feedback sends it "
                  "later); rel_l2_error_kept: the int8 step alone, on the kept entries; kept_energy: share of "
                  "||d||^2 in the kept entries",
                  "targets: ratio >= 150x at 1%, >= 1000x at 0.1%; encode <= 30 ms, decode <= 10 ms at 1%"],
    }


def run(quick: bool) -> dict[str, Any]:
    """Benchmark on the real update; ``quick`` takes fewer timing repeats."""
    torch.set_num_threads(1)
    delta, spec, info = real_update()
    repeats = 11 if quick else 51
    configs = ([CodecSpec.of(density=d) for d in DENSITIES] + [CodecSpec.of(density=0.01, topk="per-tensor")]
               + [CodecSpec.of(name="none")])
    return _result(measure(delta, spec, configs, repeats), spec, info, repeats)


def smoke() -> dict[str, Any]:
    """Seconds-long case for the harness's smoke mode: a random update of the CNN's shape, 1%."""
    torch.set_num_threads(1)
    spec = ParamSpec.from_module(get_task("mnist-cnn").build_model(0))
    delta = (np.random.default_rng(0).standard_normal(spec.size) * 1e-3).astype(np.float32)
    return _result(measure(delta, spec, [CodecSpec.of(density=0.01)], 3), spec, {"update": "random normal"}, 3)


if __name__ == "__main__":
    print(json.dumps(run(quick="--full" not in sys.argv[1:]), indent=1))
