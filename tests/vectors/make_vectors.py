"""Generate the wire-format test vectors in this folder (docs/wire-format.md, "Test vectors").

Run from the project root: ``.venv/bin/python tests/vectors/make_vectors.py``. The output is
deterministic; tests/fedmq/test_vectors.py checks the stored files against the decoders and
regenerates them in a temporary folder to catch accidental format changes.

Files per case: ``<case>.bin`` (the encoded message), and for valid cases ``<case>.decoded.npy``
(float32, the expected decoded vector) and, where re-encoding is deterministic,
``<case>.input.npy`` (the vector that was encoded). ``manifest.json`` lists specs and cases.
"""

from __future__ import annotations

import io
import json
import struct
import sys
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from fedmq import PROTOCOL_VERSION
from fedmq.codecs import CodecConfig, decode, encode
from fedmq.envelope import ClientUpdate, encode_update
from fedmq.params import ParamSpec

SPECS = {
    "tiny": ParamSpec(("w",), ((64,),), ("float32",)),
    "small": ParamSpec(("conv.weight", "conv.bias", "fc.weight", "fc.bias"),
                       ((8, 1, 5, 5), (8,), (10, 300), (10,)), ("float32",) * 4),
}


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _tiny_input() -> np.ndarray:
    x = np.linspace(-0.01, 0.01, 64, dtype=np.float32)
    x[5], x[20], x[63] = 1.0, -0.6, 0.25
    return x


def _small_input() -> np.ndarray:
    return np.random.default_rng(1).standard_normal(SPECS["small"].size).astype(np.float32)


def build() -> dict[str, bytes]:
    """All vector files, name -> content."""
    files: dict[str, bytes] = {}
    cases: list[dict[str, Any]] = []

    def valid(name: str, spec: str, x: np.ndarray, cfg: CodecConfig, seed: int | None = None) -> bytes:
        rng = None if seed is None else np.random.default_rng(seed)
        payload = encode(x, SPECS[spec], cfg, rng)
        files[f"{name}.bin"] = payload
        files[f"{name}.input.npy"] = _npy(x)
        files[f"{name}.decoded.npy"] = _npy(decode(cfg.name, payload, SPECS[spec]))
        cases.append({"name": name, "kind": "payload", "spec": spec, "codec": cfg.name, "valid": True,
                      "config": {"density": cfg.density, "block_size": cfg.block_size,
                                 "dense_below": cfg.dense_below, "stochastic": cfg.stochastic},
                      "rng_seed": seed})
        return payload

    def invalid(name: str, spec: str, kind: str, codec: str, data: bytes, error: str, why: str) -> None:
        files[f"{name}.bin"] = data
        cases.append({"name": name, "kind": kind, "spec": spec, "codec": codec, "valid": False,
                      "error": error, "why": why})

    tiny = valid("tiny-topk", "tiny", _tiny_input(), CodecConfig(density=0.05, block_size=512, dense_below=0))
    small = valid("small-topk", "small", _small_input(), CodecConfig(density=0.02, block_size=16, dense_below=64))
    valid("small-dense-fallback", "small", _small_input(), CodecConfig(density=0.9, block_size=16, dense_below=64))
    valid("small-stochastic", "small", _small_input(),
          CodecConfig(density=0.1, block_size=32, dense_below=64, stochastic=True), seed=7)
    valid("small-none", "small", _small_input(), CodecConfig(name="none"))

    update = ClientUpdate(federation="demo", device="pi-01", round=12, base_version=11, samples=800,
                          kind="delta", spec_hash=SPECS["small"].hash, codec="topk-int8", payload=small,
                          metrics={"train_loss": 0.5, "train_seconds": 2.25})
    files["small-envelope.bin"] = encode_update(update)
    files["small-envelope.decoded.npy"] = files["small-topk.decoded.npy"]
    cases.append({"name": "small-envelope", "kind": "envelope", "spec": "small", "codec": "topk-int8",
                  "valid": True, "fields": {k: v for k, v in update.__dict__.items() if k != "payload"}})

    # Invalid messages: a decoder must refuse each one with the named error.
    scale_at = 9 + 1 + 9 + (len(tiny) - 9 - 1 - 9 - 4 - 3)  # first scale of the one sparse record
    nan_scale = bytearray(tiny)
    nan_scale[scale_at:scale_at + 4] = struct.pack("<f", float("nan"))
    invalid("bad-nan-scale", "tiny", "payload", "topk-int8", bytes(nan_scale), "NonFiniteError",
            "the scale of the only block is NaN")
    # indices 0 and 64 (gaps 0 and 63, Rice b = 3): unary 1 00000001, remainders 000 111
    out_of_range = (struct.pack("<BII", 1, 512, 1) + b"\x01" + struct.pack("<IBI", 2, 3, 2)
                    + b"\x80\x80" + b"\x1c" + struct.pack("<f", 1.0) + b"\x01\x01")
    invalid("bad-index-out-of-range", "tiny", "payload", "topk-int8", out_of_range, "CodecError",
            "kept values at indices 0 and 64 of a 64-element tensor")
    invalid("bad-truncated", "small", "payload", "topk-int8", small[:-1], "CodecError",
            "the last value byte is missing")
    invalid("bad-int8-minus-128", "tiny", "payload", "topk-int8", tiny[:-1] + b"\x80", "CodecError",
            "an int8 value of -128 (outside the symmetric range)")
    invalid("bad-none-length", "small", "payload", "none", encode(_small_input(), SPECS["small"],
            CodecConfig(name="none"))[:-4], "CodecError", "a none payload one float short")
    envelope = msgpack.unpackb(files["small-envelope.bin"], raw=False)
    invalid("bad-envelope-version", "small", "envelope", "topk-int8",
            msgpack.packb({**envelope, "v": PROTOCOL_VERSION + 98}, use_bin_type=True), "WireError",
            "unknown protocol version")
    invalid("bad-envelope-spec-hash", "small", "envelope", "topk-int8",
            msgpack.packb({**envelope, "spec_hash": SPECS["tiny"].hash}, use_bin_type=True), "SpecMismatchError",
            "made for another ParamSpec")
    invalid("bad-envelope-round", "small", "envelope", "topk-int8",
            msgpack.packb({**envelope, "round": -1}, use_bin_type=True), "WireError", "negative round")

    manifest = {"protocol_version": PROTOCOL_VERSION, "specs": {k: s.to_dict() for k, s in SPECS.items()},
                "cases": cases}
    files["manifest.json"] = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()
    return files


def main(out: Path) -> None:
    for name, content in build().items():
        (out / name).write_bytes(content)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent)
