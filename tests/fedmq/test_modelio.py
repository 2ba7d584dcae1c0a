"""Global model bytes: strict safetensors round trips, ONNX export and onnxruntime parity."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmq.errors import DataError, SpecMismatchError, WireError
from fedmq.model.modelio import OnnxPredictor, export_onnx, model_from_safetensors, model_to_safetensors
from fedmq.model.params import ParamSpec
from fedmq.tasks import TASKS, get_task


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_safetensors_round_trip(name: str) -> None:
    task = get_task(name)
    src, dst = task.build_model(1), task.build_model(2)
    spec = ParamSpec.from_module(src)
    blob = model_to_safetensors(src, {"spec_hash": spec.hash, "version": "3"})
    assert not same_state(src, dst)
    meta = model_from_safetensors(blob, dst, spec)
    assert meta == {"spec_hash": spec.hash, "version": "3"}
    assert same_state(src, dst)


class WithBuffer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
        self.register_buffer("count", torch.zeros(2, dtype=torch.int64))


def test_buffers_travel_with_the_model() -> None:
    src, dst = WithBuffer(), WithBuffer()
    src.count += 5
    model_from_safetensors(model_to_safetensors(src), dst)
    assert dst.count.tolist() == [5, 5] and same_state(src, dst)


def test_metadata_must_be_strings() -> None:
    with pytest.raises(WireError, match="str"):
        model_to_safetensors(get_task("digits-logreg").build_model(0), {"version": 3})  # type: ignore[dict-item]


def test_strict_loading_rejects_other_architectures_and_leaves_the_model_alone() -> None:
    mlp = get_task("digits-mlp").build_model(0)
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    with pytest.raises(WireError, match="missing"):
        model_from_safetensors(model_to_safetensors(get_task("digits-logreg").build_model(0)), mlp)
    bigger = torch.nn.Sequential(*get_task("digits-mlp").build_model(0), torch.nn.Linear(10, 10))
    with pytest.raises(WireError, match="unexpected"):
        model_from_safetensors(model_to_safetensors(bigger), mlp)
    wide = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 256),
                               torch.nn.ReLU(), torch.nn.Linear(256, 10))
    with pytest.raises(WireError, match=r"0.weight is torch.float32 \(128, 64\)"):
        model_from_safetensors(model_to_safetensors(wide), mlp)
    assert all(torch.equal(before[k], v) for k, v in mlp.state_dict().items())


def test_dtype_mismatch_is_rejected() -> None:
    model = get_task("digits-logreg").build_model(0)
    with pytest.raises(WireError, match="float64"):
        model_from_safetensors(model_to_safetensors(get_task("digits-logreg").build_model(0).double()), model)


def test_non_finite_values_are_rejected() -> None:
    src = get_task("digits-logreg").build_model(0)
    with torch.no_grad():
        src[0].bias[3] = float("inf")
    dst = get_task("digits-logreg").build_model(1)
    before = dst[0].bias.clone()
    with pytest.raises(WireError, match="0.bias.*NaN or infinite"):
        model_from_safetensors(model_to_safetensors(src), dst)
    assert torch.equal(dst[0].bias, before)


def test_spec_mismatch() -> None:
    logreg = get_task("digits-logreg").build_model(0)
    spec = ParamSpec.from_module(logreg)
    other = ParamSpec.from_module(get_task("mnist-logreg").build_model(0))
    with pytest.raises(SpecMismatchError):
        model_from_safetensors(model_to_safetensors(logreg), logreg, other)
    with pytest.raises(SpecMismatchError, match=other.hash):
        model_from_safetensors(model_to_safetensors(logreg, {"spec_hash": other.hash}), logreg, spec)


def test_bad_bytes_are_wire_errors() -> None:
    model = get_task("digits-logreg").build_model(0)
    blob = model_to_safetensors(model)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)  # a pickle: must never be unpickled
    for bad in (b"", b"\x01", blob[:-5], blob[:20], b"\xff" * 64, buf.getvalue(),
                (len(blob) * 4).to_bytes(8, "little") + blob[8:]):
        with pytest.raises(WireError):
            model_from_safetensors(bad, model)
    with pytest.raises(WireError, match="bytes"):
        model_from_safetensors("not bytes", model)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", sorted(TASKS))
def test_onnx_matches_torch(name: str, tmp_path: Path) -> None:
    task = get_task(name)
    model = task.build_model(3)
    path = tmp_path / "model.onnx"
    data = export_onnx(model, task, path)
    assert path.read_bytes() == data
    rng = np.random.default_rng(0)
    for predictor in (OnnxPredictor(data), OnnxPredictor(path)):
        assert predictor.input_shape == task.input_shape
        for batch in (1, 33):  # the batch axis is dynamic
            x = rng.random((batch, *task.input_shape), dtype=np.float32)
            with torch.no_grad():
                expected = model(torch.from_numpy(x)).numpy()
            logits = predictor.logits(x)
            assert logits.shape == (batch, task.num_classes)
            np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)
            assert np.array_equal(predictor.predict(x), expected.argmax(axis=1))


def test_export_does_not_change_the_model() -> None:
    model = get_task("digits-logreg").build_model(0).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_onnx(model, "digits-logreg")
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_predictor_errors(tmp_path: Path) -> None:
    with pytest.raises(WireError, match="ONNX"):
        OnnxPredictor(b"not an onnx model")
    missing = tmp_path / "missing.onnx"
    with pytest.raises(DataError, match=str(missing)):
        OnnxPredictor(missing)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00junk" * 10)
    with pytest.raises(DataError, match=str(junk)):
        OnnxPredictor(junk)
    predictor = OnnxPredictor(export_onnx(get_task("digits-logreg").build_model(0), "digits-logreg"))
    with pytest.raises(DataError, match=r"\(N, 64\)"):
        predictor.logits(np.zeros((2, 8, 8), np.float32))
