"""ParamSpec, flatten_params and load_params."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from fedmq.errors import SpecMismatchError, WireError
from fedmq.model.params import ParamSpec, flatten_params, load_params

torch.set_num_threads(1)


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.frozen = torch.nn.Linear(3, 2)
        self.frozen.requires_grad_(False)
        self.fc = torch.nn.Linear(16, 5)


def test_from_module_lists_trainable_parameters_in_order_without_buffers() -> None:
    spec = ParamSpec.from_module(_Net())
    assert spec.names == ("conv.weight", "conv.bias", "bn.weight", "bn.bias", "fc.weight", "fc.bias")
    assert spec.shapes == ((4, 1, 3, 3), (4,), (4,), (4,), (5, 16), (5,))
    assert spec.dtypes == ("float32",) * 6
    assert spec.sizes == (36, 4, 4, 4, 80, 5)
    assert spec.size == 133
    assert spec.offsets == (0, 36, 40, 44, 48, 128)


def test_hash_is_sha256_of_the_documented_canonical_text() -> None:
    spec = ParamSpec(("a.weight", "a.bias", "s"), ((3, 2), (3,), ()), ("float32", "float32", "float16"))
    text = "fedmq-paramspec-v1\na.weight\tfloat32\t3,2\na.bias\tfloat32\t3\ns\tfloat16\t\n"
    assert spec.hash == hashlib.sha256(text.encode()).hexdigest()[:16]


def test_hash_is_stable_and_tells_architectures_apart() -> None:
    torch.manual_seed(0)
    a = ParamSpec.from_module(_Net())
    torch.manual_seed(1)
    assert ParamSpec.from_module(_Net()).hash == a.hash  # weights do not matter
    other = ParamSpec(a.names, a.shapes[:-1] + ((6,),), a.dtypes)
    renamed = ParamSpec(a.names[:-1] + ("head.bias",), a.shapes, a.dtypes)
    retyped = ParamSpec(a.names, a.shapes, a.dtypes[:-1] + ("float64",))
    assert len({a.hash, other.hash, renamed.hash, retyped.hash}) == 4
    assert len(a.hash) == 16 and int(a.hash, 16) >= 0


def test_dict_round_trip_and_hash_check() -> None:
    spec = ParamSpec.from_module(_Net())
    d = spec.to_dict()
    assert ParamSpec.from_dict(d) == spec
    d["hash"] = "0" * 16
    with pytest.raises(WireError, match="hash"):
        ParamSpec.from_dict(d)


@pytest.mark.parametrize("bad", [
    None, [], {"names": ["a"]}, {"names": ["a"], "shapes": [[2]], "dtypes": ["int8"]},
    {"names": ["a"], "shapes": [[0]], "dtypes": ["float32"]},
    {"names": ["a", "a"], "shapes": [[1], [1]], "dtypes": ["float32", "float32"]},
    {"names": ["a"], "shapes": [[-1]], "dtypes": ["float32"]},
    {"names": ["a"], "shapes": [["2"]], "dtypes": ["float32"]},
    {"names": ["a"], "shapes": [[2], [3]], "dtypes": ["float32"]},
    {"names": [], "shapes": [], "dtypes": []},
    {"names": ["a\tb"], "shapes": [[2]], "dtypes": ["float32"]},
    {"names": ["a"], "shapes": [[2**20, 2**12]], "dtypes": ["float32"]},
    {"names": ["a"], "shapes": 5, "dtypes": ["float32"]},
])
def test_malformed_specs_raise_wire_error(bad: object) -> None:
    with pytest.raises(WireError):
        ParamSpec.from_dict(bad)


def test_flatten_and_load_round_trip() -> None:
    torch.manual_seed(0)
    net = _Net()
    spec = ParamSpec.from_module(net)
    vec = flatten_params(net, spec)
    assert vec.dtype == np.float32 and vec.shape == (spec.size,)
    np.testing.assert_array_equal(vec[:36], net.conv.weight.detach().numpy().reshape(-1))
    np.testing.assert_array_equal(vec[128:], net.fc.bias.detach().numpy())
    frozen_before = net.frozen.weight.detach().clone()
    running_mean = net.bn.running_mean.clone()
    new = np.arange(spec.size, dtype=np.float32)
    load_params(net, new, spec)
    np.testing.assert_array_equal(flatten_params(net), new)
    assert torch.equal(net.frozen.weight, frozen_before)
    assert torch.equal(net.bn.running_mean, running_mean)
    # the vector is a copy, not a view of the parameters
    vec2 = flatten_params(net)
    vec2[:] = 0
    np.testing.assert_array_equal(flatten_params(net), new)


def test_non_float32_parameters_are_cast() -> None:
    net = torch.nn.Linear(3, 2).to(torch.float64)
    spec = ParamSpec.from_module(net)
    assert spec.dtypes == ("float64", "float64")
    load_params(net, np.full(spec.size, 0.5, dtype=np.float32), spec)
    assert net.weight.dtype == torch.float64 and torch.all(net.weight == 0.5)
    assert flatten_params(net, spec).dtype == np.float32


def test_mismatches_raise_spec_mismatch() -> None:
    net = _Net()
    spec = ParamSpec.from_module(net)
    other = ParamSpec.from_module(torch.nn.Linear(2, 2))
    with pytest.raises(SpecMismatchError):
        flatten_params(net, other)
    with pytest.raises(SpecMismatchError):
        load_params(net, np.zeros(spec.size, dtype=np.float32), other)
    with pytest.raises(SpecMismatchError):
        load_params(net, np.zeros(spec.size + 1, dtype=np.float32), spec)
