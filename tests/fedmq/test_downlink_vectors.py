"""The stored downlink test vectors (tests/vectors/downlink/, docs/wire-format.md) against the decoders."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest

from fedmq.fl.chain import DeltaBlob, ModelChain
from fedmq.errors import WireError
from fedmq.fl.downlink import params_sha256
from fedmq.model.params import ParamSpec

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "downlink"
MANIFEST = json.loads((VECTORS / "manifest.json").read_text())
SPEC = ParamSpec.from_dict(MANIFEST["spec"])


def _npy(name: str) -> np.ndarray:
    return np.load(io.BytesIO((VECTORS / name).read_bytes()), allow_pickle=False)


def test_deltas_turn_each_version_into_the_next_bit_for_bit():
    assert SPEC.hash == MANIFEST["spec_hash"]
    vec = _npy("v0.npy")
    assert params_sha256(vec) == MANIFEST["sha256"]["v0"]
    for v in (1, 2):
        blob = DeltaBlob.from_bytes((VECTORS / f"delta-{v}.bin").read_bytes())
        assert (blob.base_version, blob.version, blob.codec) == (v - 1, v, MANIFEST["codec"]["name"])
        vec = blob.apply(vec, SPEC)
        assert vec.tobytes() == _npy(f"v{v}.npy").tobytes()
        assert params_sha256(vec) == MANIFEST["sha256"][f"v{v}"] == blob.sha256


def test_chain_names_the_deltas_and_hashes():
    chain = ModelChain.from_bytes((VECTORS / "chain.bin").read_bytes())
    assert chain.latest == 2 and chain.latest_sha256 == MANIFEST["sha256"]["v2"]
    assert chain.origin_sha256 == MANIFEST["sha256"]["v0"] and chain.seed == 7
    assert [(e.version, e.blob_sha256) for e in chain.deltas] == [
        (v, MANIFEST["blob_sha256"][f"delta-{v}"]) for v in (1, 2)]


@pytest.mark.parametrize("name", sorted(MANIFEST["bad"]))
def test_bad_delta_blobs_are_refused_with_a_wire_error(name):
    data = (VECTORS / name).read_bytes()
    with pytest.raises(WireError, match=MANIFEST["bad"][name]):
        DeltaBlob.from_bytes(data).apply(_npy("v0.npy"), SPEC)


def test_generator_reproduces_the_stored_files(tmp_path):
    spec = importlib.util.spec_from_file_location("make_downlink_vectors", VECTORS / "make_vectors.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(tmp_path)
    stored = {p.name for p in VECTORS.iterdir() if p.name != "make_vectors.py" and p.is_file()}
    assert stored == {p.name for p in tmp_path.iterdir()}
    for name in stored:
        assert (tmp_path / name).read_bytes() == (VECTORS / name).read_bytes(), name
