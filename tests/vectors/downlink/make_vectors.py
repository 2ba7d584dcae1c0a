"""Generate the compressed-downlink test vectors in this folder (docs/wire-format.md,
"Downlink test vectors").

Run from the project root: ``python tests/vectors/downlink/make_vectors.py [OUT_DIR]``. The
output is deterministic; tests/fedmq/test_downlink_vectors.py checks the stored files against
the decoders and regenerates them in a temporary folder to catch accidental format changes.

Files: ``v0.npy`` (float32, the published model of version 0), ``target-1.npy`` /
``target-2.npy`` (the server model after each optimizer step), ``delta-1.bin`` /
``delta-2.bin`` (delta blobs, version 0 -> 1 -> 2), ``v1.npy`` / ``v2.npy`` (the published
models they produce, bit for bit), ``chain.bin`` (a version chain naming them), the bad cases
``bad-*.bin``, and ``manifest.json`` (spec, codec settings, every SHA-256, the expected errors).
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
from pathlib import Path

import numpy as np

from fedmq.fl.chain import ChainEntry, DeltaBlob, ModelChain
from fedmq.codecs import CodecSpec
from fedmq.fl.downlink import compress_step, params_sha256
from fedmq.model.params import ParamSpec

SPEC = ParamSpec(("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"), ((32, 64), (32,), (10, 32), (10,)),
                 ("float32",) * 4)
# Per-tensor Top-K (the vectors predate global selection; the format is the same either way).
CONFIG = CodecSpec.of(name="topk-int8", density=0.02, block_size=64, dense_below=64, topk="per-tensor")


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def build() -> dict[str, bytes]:
    """File name -> bytes of every vector."""
    rng = np.random.default_rng(20261201)
    v0 = (0.1 * rng.standard_normal(SPEC.size)).astype(np.float32)
    v0[3] = np.float32(-0.0)  # a negative zero: dense addition of 0.0 makes it +0.0 on both sides
    files: dict[str, bytes] = {"v0.npy": _npy(v0)}
    published, blobs, entries = v0, {}, []
    for version in (1, 2):
        target = published + (0.01 * rng.standard_normal(SPEC.size)).astype(np.float32)
        step = compress_step(published, target, SPEC, CONFIG)
        blob = DeltaBlob(CONFIG.name, SPEC.hash, version - 1, version, params_sha256(published),
                         params_sha256(step.published), step.payload).to_bytes()
        files[f"target-{version}.npy"] = _npy(target)
        files[f"delta-{version}.bin"] = blob
        files[f"v{version}.npy"] = _npy(step.published)
        blobs[version] = blob
        entries.append(ChainEntry(version, len(blob), hashlib.sha256(blob).hexdigest(), params_sha256(step.published)))
        published = step.published
    snapshot = ChainEntry(0, 123456, "0" * 64, params_sha256(v0))  # a snapshot entry (its blob is not a vector here)
    files["chain.bin"] = ModelChain(SPEC.hash, CONFIG.name, 7, params_sha256(v0), 2, params_sha256(published),
                                    snapshot, tuple(entries)).to_bytes()
    good = blobs[1]
    name_end = 6 + len(CONFIG.name)
    files["bad-magic.bin"] = b"FMQX" + good[4:]
    files["bad-layout.bin"] = good[:4] + b"\x02" + good[5:]
    files["bad-truncated.bin"] = good[:-1]
    files["bad-versions.bin"] = good[:name_end + 8] + (5).to_bytes(8, "little") + good[name_end + 16:]
    files["bad-hash.bin"] = good[:name_end + 32] + bytes(32) + good[name_end + 64:]  # wrong base SHA-256
    manifest = {
        "spec": SPEC.to_dict(), "spec_hash": SPEC.hash,
        "codec": {"name": CONFIG.name, **{k: v for k, v in CONFIG.params.as_dict().items() if k != "stochastic"}},
        "sha256": {f"v{v}": params_sha256(np.load(io.BytesIO(files[f"v{v}.npy"]))) for v in (0, 1, 2)},
        "blob_sha256": {f"delta-{v}": hashlib.sha256(blobs[v]).hexdigest() for v in (1, 2)},
        "bad": {"bad-magic.bin": "magic", "bad-layout.bin": "layout", "bad-truncated.bin": "payload of",
                "bad-versions.bin": "V-1 -> V", "bad-hash.bin": "base SHA-256 does not match"},
    }
    files["manifest.json"] = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()
    return files


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, data in build().items():
        (out / name).write_bytes(data)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent)
