"""Model vectors: a module's trainable parameters as one float32 vector, in a fixed order.

A :class:`ParamSpec` lists the trainable tensors (names, shapes, dtypes) in
``named_parameters()`` order. Its :attr:`ParamSpec.hash` lets a coordinator and a device
tell at once whether they hold the same architecture (docs/wire-format.md, "ParamSpec").

Buffers (BatchNorm running statistics, counters) are not trainable parameters and are never
part of a client update: the coordinator's buffers travel with the global model, device-side
buffer changes are not sent and are overwritten by the next global model.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch

from fedmq.errors import SpecMismatchError, WireError

#: Parameter dtypes a ParamSpec may name. Vectors are always float32; other float dtypes
#: are cast on flatten / load.
DTYPES = ("float32", "float16", "bfloat16", "float64")

#: Largest number of elements of one tensor: index arithmetic in the codec stays in int64.
MAX_TENSOR_ELEMENTS = 2**31 - 1

#: Prefix of the canonical text the hash is taken over (changes if the canonical form does).
_HASH_DOMAIN = "fedmq-paramspec-v1\n"


@dataclass(frozen=True)
class ParamSpec:
    """Ordered description of a model's trainable parameters.

    Fields:
        names: parameter names, in ``named_parameters()`` order, unique.
        shapes: one tuple of non-negative ints per tensor; every tensor has >= 1 element
            and at most :data:`MAX_TENSOR_ELEMENTS`.
        dtypes: one of :data:`DTYPES` per tensor (the module's dtype; vectors are float32).

    Derived: :attr:`size` (total elements), :attr:`sizes`, :attr:`offsets` (start of each
    tensor in the flat vector), :attr:`hash` (16 hex chars: the first 64 bits of SHA-256 of
    the canonical text ``"fedmq-paramspec-v1\\n"`` followed by one line
    ``name \\t dtype \\t d1,d2,...\\n`` per tensor, UTF-8).

    Raises:
        WireError: on construction, when the fields are inconsistent or out of range.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    def __post_init__(self) -> None:
        if not (isinstance(self.names, tuple) and isinstance(self.shapes, tuple) and isinstance(self.dtypes, tuple)):
            raise WireError("ParamSpec: names, shapes and dtypes must be tuples")
        if not (len(self.names) == len(self.shapes) == len(self.dtypes)) or not self.names:
            raise WireError(f"ParamSpec: names, shapes, dtypes must have the same non-zero length, got "
                            f"{len(self.names)}, {len(self.shapes)}, {len(self.dtypes)}")
        if len(set(self.names)) != len(self.names):
            raise WireError("ParamSpec: parameter names must be unique")
        for name, shape, dtype in zip(self.names, self.shapes, self.dtypes):
            if not isinstance(name, str) or not name or "\t" in name or "\n" in name:
                raise WireError(f"ParamSpec: invalid parameter name {name!r}")
            if dtype not in DTYPES:
                raise WireError(f"ParamSpec: {name}: dtype {dtype!r} not one of {DTYPES}")
            if not isinstance(shape, tuple) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                       for d in shape):
                raise WireError(f"ParamSpec: {name}: shape {shape!r} must be a tuple of ints >= 0")
            n = math.prod(shape)
            if not 1 <= n <= MAX_TENSOR_ELEMENTS:
                raise WireError(f"ParamSpec: {name}: {n} elements, expected 1..{MAX_TENSOR_ELEMENTS}")

    @classmethod
    def from_module(cls, module: torch.nn.Module) -> ParamSpec:
        """Spec of ``module``'s trainable parameters (``requires_grad``), in ``named_parameters()`` order.

        Raises:
            WireError: a parameter has an unsupported dtype or no element.
        """
        names, shapes, dtypes = [], [], []
        for name, p in module.named_parameters():
            if p.requires_grad:
                names.append(name)
                shapes.append(tuple(int(d) for d in p.shape))
                dtypes.append(str(p.dtype).removeprefix("torch."))
        return cls(tuple(names), tuple(shapes), tuple(dtypes))

    @cached_property
    def sizes(self) -> tuple[int, ...]:
        """Number of elements of each tensor."""
        return tuple(math.prod(s) for s in self.shapes)

    @cached_property
    def size(self) -> int:
        """Total number of elements (length of the flat vector)."""
        return sum(self.sizes)

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        """Start of each tensor in the flat vector."""
        out, acc = [], 0
        for n in self.sizes:
            out.append(acc)
            acc += n
        return tuple(out)

    @cached_property
    def hash(self) -> str:
        """Stable architecture fingerprint: 16 lower-case hex chars (see the class docstring)."""
        text = _HASH_DOMAIN + "".join(f"{n}\t{t}\t{','.join(str(d) for d in s)}\n"
                                      for n, s, t in zip(self.names, self.shapes, self.dtypes))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON / msgpack friendly):
        ``{"names": [...], "shapes": [[...]], "dtypes": [...], "hash": str}``."""
        return {"names": list(self.names), "shapes": [list(s) for s in self.shapes],
                "dtypes": list(self.dtypes), "hash": self.hash}

    @classmethod
    def from_dict(cls, obj: Any) -> ParamSpec:
        """Inverse of :meth:`to_dict`. A ``hash`` key, if present, must match.

        Raises:
            WireError: malformed dict, or the stored hash differs from the recomputed one.
        """
        if not isinstance(obj, dict):
            raise WireError(f"ParamSpec: expected a dict, got {type(obj).__name__}")
        try:
            names, shapes, dtypes = obj["names"], obj["shapes"], obj["dtypes"]
            spec = cls(tuple(names), tuple(tuple(s) for s in shapes), tuple(dtypes))
        except (KeyError, TypeError) as exc:
            raise WireError(f"ParamSpec: malformed dict ({exc!r})") from None
        if "hash" in obj and obj["hash"] != spec.hash:
            raise WireError(f"ParamSpec: stored hash {obj['hash']!r} differs from computed {spec.hash!r}")
        return spec


def _trainable(module: torch.nn.Module, spec: ParamSpec | None) -> tuple[ParamSpec, list[torch.Tensor]]:
    params = [p for _, p in module.named_parameters() if p.requires_grad]
    own = ParamSpec.from_module(module)
    if spec is not None and spec.hash != own.hash:
        raise SpecMismatchError(f"module has ParamSpec {own.hash}, expected {spec.hash}")
    return own, params


def flatten_params(module: torch.nn.Module, spec: ParamSpec | None = None) -> np.ndarray:
    """Concatenate ``module``'s trainable parameters into one vector.

    Args:
        module: the model.
        spec: if given, the module must match it.

    Returns:
        float32 array of shape ``(spec.size,)``, a copy, in spec order (each tensor row-major).

    Raises:
        SpecMismatchError: the module's architecture differs from ``spec``.
    """
    own, params = _trainable(module, spec)
    out = np.empty(own.size, dtype=np.float32)
    with torch.no_grad():
        for p, off, n in zip(params, own.offsets, own.sizes):
            out[off:off + n] = p.detach().reshape(-1).to(torch.float32).cpu().numpy()
    return out


def load_params(module: torch.nn.Module, vector: np.ndarray, spec: ParamSpec | None = None) -> None:
    """Copy ``vector`` into ``module``'s trainable parameters (cast to each parameter's dtype).

    Args:
        vector: float array of shape ``(spec.size,)`` in spec order.

    Raises:
        SpecMismatchError: the module differs from ``spec`` or ``vector`` has the wrong shape.
    """
    own, params = _trainable(module, spec)
    vec = np.asarray(vector)
    if vec.shape != (own.size,):
        raise SpecMismatchError(f"vector shape {vec.shape} does not match ParamSpec size ({own.size},)")
    with torch.no_grad():
        for p, off, n in zip(params, own.offsets, own.sizes):
            src = torch.from_numpy(np.ascontiguousarray(vec[off:off + n], dtype=np.float32))
            p.copy_(src.view(p.shape))
