"""The global model as bytes: safetensors for training, ONNX for inference on devices.

* :func:`model_to_safetensors` / :func:`model_from_safetensors`: every parameter and buffer
  of a module in the safetensors format (a JSON header and raw little-endian tensors; no
  code execution on load, unlike pickle), with string metadata (e.g. version, round,
  ParamSpec hash). Loading is strict: the file must hold exactly the module's tensors with
  the same shapes and dtypes, all finite.
* :func:`export_onnx`: ONNX (opset 18) with a dynamic batch axis, through torch's
  ``torch.export``-based exporter (``dynamo=True``; the TorchScript exporter is deprecated
  since torch 2.9 and slated for removal).
* :class:`OnnxPredictor` (from :mod:`fedmq.model.inference`, which imports no torch):
  onnxruntime inference on the CPU, for devices that run the model without torch.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import struct
import warnings

import torch

from fedmq.storage.atomic import atomic_write_bytes
from fedmq.errors import SpecMismatchError, WireError
from fedmq.model.inference import ONNX_INPUT, ONNX_META_KIND, ONNX_META_TASK, ONNX_OUTPUT, OnnxPredictor
from fedmq.model.params import ParamSpec
from fedmq.tasks import Task, get_task

#: ONNX operator set of exported models (onnxruntime >= 1.14 runs it).
ONNX_OPSET = 18

__all__ = ["MAX_HEADER_BYTES", "ONNX_INPUT", "ONNX_META_KIND", "ONNX_META_TASK", "ONNX_OPSET", "ONNX_OUTPUT",
           "OnnxPredictor", "export_onnx", "model_from_safetensors", "model_to_safetensors"]

#: Largest safetensors JSON header accepted, bytes (the format's own limit is 100 MB; ours
#: are a few KB, and a bound keeps a hostile length field from costing memory).
MAX_HEADER_BYTES = 16 * 1024 * 1024


def model_to_safetensors(model: torch.nn.Module, metadata: dict[str, str] | None = None) -> bytes:
    """Serialise all parameters and buffers of ``model`` (its ``state_dict``) to safetensors.

    Args:
        metadata: string to string map stored in the header (``__metadata__``).

    Returns:
        The safetensors bytes.

    Raises:
        WireError: a metadata key or value is not a str.
    """
    from safetensors.torch import save

    metadata = dict(metadata or {})
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise WireError(f"safetensors metadata must map str to str, got {key!r}: {value!r}")
    tensors = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    return save(tensors, metadata=metadata)


def _header_metadata(data: bytes) -> dict[str, str]:
    if len(data) < 8:
        raise WireError(f"safetensors: {len(data)} bytes, too short for the 8-byte header length")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > MAX_HEADER_BYTES or 8 + header_len > len(data):
        raise WireError(f"safetensors: header length {header_len} exceeds the data ({len(data)} bytes) "
                        f"or the {MAX_HEADER_BYTES}-byte limit")
    try:
        header = json.loads(data[8:8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireError(f"safetensors: header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise WireError("safetensors: header is not a JSON object")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise WireError("safetensors: __metadata__ must map str to str")
    return metadata


def model_from_safetensors(data: bytes, model: torch.nn.Module, spec: ParamSpec | None = None) -> dict[str, str]:
    """Load safetensors bytes into ``model`` (all parameters and buffers), strictly.

    Nothing is copied into ``model`` unless every check passes.

    Args:
        data: bytes from :func:`model_to_safetensors`.
        model: the module to load into (its architecture must match ``spec``).
        spec: the expected ParamSpec; when given, the module must match it and a
            ``spec_hash`` metadata entry, if present, must equal ``spec.hash``.

    Returns:
        The metadata map.

    Raises:
        SpecMismatchError: ``model`` or the ``spec_hash`` metadata differs from ``spec``.
        WireError: unparsable bytes, missing or extra tensors, a shape or dtype that differs
            from the module's, or a NaN / infinite value.
    """
    from safetensors.torch import load

    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"safetensors: expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if spec is not None:
        own = ParamSpec.from_module(model)
        if own.hash != spec.hash:
            raise SpecMismatchError(f"model has ParamSpec {own.hash}, expected {spec.hash}")
    metadata = _header_metadata(data)
    if spec is not None and "spec_hash" in metadata and metadata["spec_hash"] != spec.hash:
        raise SpecMismatchError(f"safetensors model is for ParamSpec {metadata['spec_hash']}, expected {spec.hash}")
    try:
        tensors = load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError and bare exceptions
        raise WireError(f"safetensors: cannot parse ({exc})") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise WireError(f"safetensors: tensors do not match the model (missing {missing}, unexpected {extra})")
    for name, ref in expected.items():
        got = tensors[name]
        if got.shape != ref.shape or got.dtype != ref.dtype:
            raise WireError(f"safetensors: {name} is {got.dtype} {tuple(got.shape)}, "
                            f"expected {ref.dtype} {tuple(ref.shape)}")
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            raise WireError(f"safetensors: {name} contains NaN or infinite values")
    model.load_state_dict(tensors, strict=True)
    return metadata


def export_onnx(model: torch.nn.Module, task: Task | str,
                path: str | os.PathLike[str] | None = None, metadata: dict[str, str] | None = None) -> bytes:
    """Export ``model`` to ONNX (opset :data:`ONNX_OPSET`), input ``"input"`` float32
    ``(batch, *task.input_shape)`` with a dynamic batch axis, output ``"logits"`` float32:
    ``(batch, num_classes)`` for a classifier, the model's own output shape for a
    regression task (the name is kept for both). The task's name and kind are stored in
    the model's metadata (:data:`ONNX_META_TASK`, :data:`ONNX_META_KIND`).

    The model is exported from a copy in eval mode, traced on the task's example inputs
    (:meth:`fedmq.tasks.Task.example_batch`); ``model`` itself is not changed.

    Args:
        task: the model's task (or a reference :func:`fedmq.tasks.get_task` resolves).
        path: if given, the bytes are also written there atomically.
        metadata: more string metadata for the model (e.g. the ``dp_epsilon`` and ``dp_delta``
            of a model trained with differential privacy, docs/privacy.md).

    Returns:
        The serialised ONNX model (weights inline).

    Raises:
        ConfigError: unknown task. OSError: ``path`` cannot be written.
    """
    task = get_task(task) if isinstance(task, str) else task
    frozen = copy.deepcopy(model).float().eval()
    example = (torch.from_numpy(task.example_batch(2)),)
    # The exporter logs one warning per torchvision operator it cannot register (fedmq's models
    # use none) and torch's own pytree code trips a deprecation warning of torch; both only
    # hide real messages.
    registration_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    previous_level = registration_log.level
    registration_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
            program = torch.onnx.export(
                frozen, example, dynamo=True, opset_version=ONNX_OPSET, input_names=[ONNX_INPUT],
                output_names=[ONNX_OUTPUT], dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    finally:
        registration_log.setLevel(previous_level)
    proto = program.model_proto
    for key, value in ((ONNX_META_TASK, task.name), (ONNX_META_KIND, task.kind), *(metadata or {}).items()):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    data = proto.SerializeToString()
    if path is not None:
        atomic_write_bytes(path, data)
    return data
