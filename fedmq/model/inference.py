"""Inference with the global model's ONNX export: onnxruntime and NumPy only, no torch.

A device that only predicts (``fedmq edge predict --model FILE``) imports this module and
never torch: its peak resident memory stays near onnxruntime's own (benchmarks/device.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from fedmq.errors import DataError, WireError

ONNX_INPUT, ONNX_OUTPUT = "input", "logits"
#: ONNX metadata keys fedmq writes (``metadata_props``): the task's name and kind.
ONNX_META_TASK, ONNX_META_KIND = "fedmq.task", "fedmq.kind"


class OnnxPredictor:
    """Inference with onnxruntime on the CPU (no torch needed on the device).

    Args:
        data_or_path: ONNX bytes (from :func:`export_onnx`) or a path to an ``.onnx`` file.
        threads: intra-op threads (1 keeps a small device responsive).

    Raises:
        DataError: the file is missing or not a valid ONNX model (names the path).
        WireError: the bytes are not a valid ONNX model.
    """

    def __init__(self, data_or_path: bytes | str | os.PathLike[str], threads: int = 1) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        if isinstance(data_or_path, (bytes, bytearray, memoryview)):
            source, where, error = bytes(data_or_path), "ONNX bytes", WireError
        else:
            path = Path(data_or_path)
            if not path.is_file():
                raise DataError(f"{path}: ONNX model file not found")
            source, where, error = str(path), str(path), DataError
        try:
            self._session = ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own unrelated exception types
            raise error(f"{where}: not a valid ONNX model ({str(exc)[:300]})") from None
        inp = self._session.get_inputs()[0]
        self._input = inp.name
        #: Per-sample input shape (without the batch axis), as the model declares it.
        self.input_shape: tuple[int, ...] = tuple(int(d) for d in inp.shape[1:])
        meta = self._session.get_modelmeta().custom_metadata_map
        #: ``"classification"`` or ``"regression"`` (from the model's metadata; models
        #: exported before fedmq stored it are classifiers).
        self.kind: str = meta.get(ONNX_META_KIND, "classification")
        #: The task's name, ``""`` when the model does not say.
        self.task: str = meta.get(ONNX_META_TASK, "")

    def logits(self, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """The model's output for a batch x ``(N, *input_shape)`` (converted to float32):
        logits float32 ``(N, num_classes)`` of a classifier, predicted values of a
        regression model.

        Args:
            batch_size: samples per onnxruntime call (bounds memory only, not the result).

        Raises:
            DataError: ``x`` does not have shape ``(N, *input_shape)``.
        """
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape:
            raise DataError(f"input of shape {x.shape}, expected (N, {', '.join(map(str, self.input_shape))})")
        # Batches bound the activations onnxruntime holds (the MNIST CNN's first layer is
        # 100 KB per image), not the result.
        return np.concatenate([self._session.run(None, {self._input: x[i:i + batch_size]})[0]
                               for i in range(0, max(len(x), 1), batch_size)])

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Predicted classes, int64 ``(N,)`` (arg-max of :meth:`logits`), or for a regression
        model its predicted values, float32 (the output of :meth:`logits`)."""
        out = self.logits(x)
        if self.kind == "regression":
            return out
        return out.argmax(axis=1).astype(np.int64)
