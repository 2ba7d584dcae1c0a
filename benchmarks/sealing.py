"""Sealing benchmark: what sealing client updates to the coordinator's key costs (fedmq.security.sealing).

Two parts:

1. **One update**: the real MNIST CNN client update of ``benchmarks.codec`` (one local epoch
   on device 0's 800 images), compressed as shipped (topk-int8, density 1%, global Top-K)
   and dense (``none``), in its envelope. For each: envelope bytes, sealed bytes, seal and
   open times (median of repeats, one thread), beside the codec's own encode time; and the
   alternative of sealing each 256 KiB chunk on its own (fedmq seals the whole blob before
   chunking: one HPKE set-up, 61 bytes, whatever the size; per chunk costs a set-up and 61
   bytes per chunk and would have to be undone before the receiver's sha256 check).
2. **The product's path**: ``fedmq demo`` with the MNIST CNN over the in-memory link (real
   coordinator and agents), sealed and not, the same seeded federation: the bytes the link
   carried up, the final accuracy and the wall time.

    python -m benchmarks.sealing [--full]     prints the result as JSON
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any, Callable

import numpy as np
import torch

from benchmarks.codec import real_update
from fedmq.codecs import CodecSpec, encode
from fedmq.wire.envelope import ClientUpdate, encode_update
from fedmq.model.params import ParamSpec
from fedmq.security.sealing import SEAL_OVERHEAD, load_or_create_key, seal_update
from fedmq.transport.settings import DEFAULT_MAX_CHUNK

WHERE = {"federation": "bench", "device": "dev-0", "transfer_id": "0" * 32}


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(1e3 * statistics.median(times), 3)


def one_update(delta: np.ndarray, spec: ParamSpec, repeats: int, key_dir: str) -> list[dict[str, Any]]:
    """Seal / open cost and bytes of one client update, per codec."""
    key = load_or_create_key(key_dir)
    rows = []
    for cfg in (CodecSpec.of(), CodecSpec.of(name="none")):
        payload = encode(delta, spec, cfg)
        envelope = encode_update(ClientUpdate(federation="bench", device="dev-0", round=1, base_version=0,
                                              samples=800, kind="delta", spec_hash=spec.hash, codec=cfg.name,
                                              payload=payload, metrics={"train_loss": 0.1}))
        sealed = seal_update(envelope, key.public, **WHERE)
        assert key.open_update(sealed, **WHERE) == envelope
        chunks = [envelope[i:i + DEFAULT_MAX_CHUNK] for i in range(0, len(envelope), DEFAULT_MAX_CHUNK)]
        rows.append({
            "codec": cfg.name, "density": cfg.params.density if cfg.name != "none" else 1.0,
            "envelope_bytes": len(envelope), "sealed_bytes": len(sealed),
            "overhead_bytes": len(sealed) - len(envelope),
            "overhead_pct": round(100 * (len(sealed) - len(envelope)) / len(envelope), 3),
            "encode_ms": _median_ms(lambda: encode(delta, spec, cfg), repeats),
            "seal_ms": _median_ms(lambda: seal_update(envelope, key.public, **WHERE), repeats),
            "open_ms": _median_ms(lambda: key.open_update(sealed, **WHERE), repeats),
            "chunks": len(chunks),
            "per_chunk_sealed_bytes": len(chunks) * SEAL_OVERHEAD + len(envelope),
            "per_chunk_seal_ms": _median_ms(lambda: [seal_update(c, key.public, **WHERE) for c in chunks], repeats),
        })
    return rows


def product_path(quick: bool, out: str) -> dict[str, Any]:
    """The MNIST CNN demo over the in-memory link, sealed and plain (same seed)."""
    from fedmq.data import MNIST_T10K_DIR, shared_data_dir
    from fleet.demo import DemoSettings, run_demo

    runs = {}
    for seal in (False, True):
        t = time.perf_counter()
        s = run_demo(DemoSettings(
            devices=4, per_round=4, rounds=2 if quick else 5, task="mnist-cnn", data="mnist",
            data_dir=shared_data_dir() / MNIST_T10K_DIR, broker="memory", devices_in="threads",
            out=f"{out}/{'sealed' if seal else 'plain'}", write_files=False, publish_onnx=False, seal=seal))
        runs["sealed" if seal else "plain"] = {
            "updates_accepted": s["updates_accepted"], "bytes_up_total": s["bytes_up_total"],
            "final_accuracy": s["final_accuracy"], "wall_s": round(time.perf_counter() - t, 2)}
    plain, sealed = runs["plain"], runs["sealed"]
    runs["bytes_up_ratio"] = round(sealed["bytes_up_total"] / plain["bytes_up_total"], 5)
    runs["same_accuracy"] = sealed["final_accuracy"] == plain["final_accuracy"]
    return runs


def run(quick: bool) -> dict[str, Any]:
    import tempfile

    torch.set_num_threads(1)
    delta, spec, info = real_update()
    repeats = 21 if quick else 101
    with tempfile.TemporaryDirectory(prefix="fedmq-bench-seal-") as tmp:
        rows = one_update(delta, spec, repeats, f"{tmp}/coordinator-state")
        demo = product_path(quick, tmp)
    return {"params": spec.size, "repeats": repeats, "torch_threads": torch.get_num_threads(),
            "train_seconds": info["train_seconds"], "rows": rows, "demo_in_memory": demo,
            "notes": ["seal = HPKE base mode (DHKEM X25519 HKDF-SHA256, ChaCha20-Poly1305) of the whole envelope; "
                      "open = the coordinator's decryption; times are medians, one thread",
                      "per_chunk_*: the rejected alternative, sealing each 256 KiB chunk on its own",
                      "demo_in_memory: fedmq demo, MNIST CNN, 4 devices, all per round, in-memory link; "
                      "bytes_up_total = what the link carried up (chunk headers and manifests included)"]}


if __name__ == "__main__":
    print(json.dumps(run(quick="--full" not in sys.argv[1:]), indent=1))
