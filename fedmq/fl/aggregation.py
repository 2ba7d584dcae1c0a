"""How client updates are combined: the :class:`Aggregator` seam and its registry.

An aggregation rule is a small object with ``add(update, weight)``, ``count`` and
``result()``; :func:`make_aggregator` builds the one a configuration names
(``[aggregation] rule`` in the coordinator's configuration). A new rule is one module with
a class implementing :class:`Aggregator` plus one :func:`register_aggregator` line.

The first rule, ``weighted-mean``: a streaming, sample-weighted mean.

Each accepted client update is added into ONE accumulator the size of the model as soon
as it is validated (``SparseUpdate.add_into``), so a round holds one model-sized array
whatever the number of participants; updates are never all kept in memory. The mean is
``sum_i n_i u_i / sum_i n_i`` with ``n_i`` the update's sample count (McMahan et al. 2017).

The accumulator is float64: a round may add thousands of updates, and float64 keeps the
result independent of arrival order to far below float32 resolution.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np

from fedmq.errors import ConfigError
from fedmq.fl import robust
from fedmq.wire.messages import UPDATE_KINDS


class _AddsInto(Protocol):
    def add_into(self, out: np.ndarray, weight: float) -> None: ...


@runtime_checkable
class Aggregator(Protocol):
    """Combines the accepted client updates of one round (or one buffer) into one vector.

    Attributes:
        count: number of updates added so far.
    """

    count: int

    def add(self, update: _AddsInto, weight: float) -> None:
        """Add one decoded, validated update (a :class:`fedmq.codecs.SparseUpdate`) with
        ``weight`` > 0 (its sample count, or a staleness-discounted one).

        Raises: ValueError for a weight that is not positive and finite."""
        ...

    def result(self) -> np.ndarray:
        """The combined update, float32 ``(d,)``. Raises ValueError when nothing was added."""
        ...


_REGISTRY: dict[str, Callable[..., Aggregator]] = {}


def register_aggregator(name: str, factory: Callable[..., Aggregator]) -> None:
    """Make ``factory(size, **options) -> Aggregator`` available as the rule ``name``
    (its keyword parameters are the rule's options, see :func:`make_aggregator`).

    Raises:
        ConfigError: another factory is registered under ``name``.
    """
    other = _REGISTRY.get(name)
    if other is not None and other is not factory:
        raise ConfigError(f"an aggregation rule named {name!r} is already registered ({other!r})")
    _REGISTRY[name] = factory


def aggregator_names() -> tuple[str, ...]:
    """Names of the registered aggregation rules."""
    return tuple(_REGISTRY)


def make_aggregator(name: str, size: int, options: Mapping[str, Any] | None = None) -> Aggregator:
    """A fresh aggregator of rule ``name`` for a model of ``size`` parameters.

    Args:
        options: settings offered to the rule (``[aggregation]`` of the coordinator's
            configuration); the rule takes those its factory has a keyword parameter for
            and ignores the others, so one configuration serves every rule.

    Raises:
        ConfigError: unknown rule (the message lists the registered ones), or an option the
            rule refuses.
    """
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown aggregation rule {name!r}, expected one of {aggregator_names()}") from None
    accepted = inspect.signature(factory).parameters
    return factory(size, **{k: v for k, v in (options or {}).items() if k in accepted and k != "size"})


class WeightedMean:
    """Streaming weighted mean of client updates.

    Args:
        size: number of model parameters ``d``.

    Attributes:
        total: float64 (d,) running ``sum_i w_i u_i``.
        weight: running ``sum_i w_i``.
        count: number of updates added.
    """

    def __init__(self, size: int) -> None:
        self.total = np.zeros(size, dtype=np.float64)
        self.weight = 0.0
        self.count = 0

    def add(self, update: _AddsInto, weight: float) -> None:
        """Add ``weight * update`` (a decoded, validated ``fedmq.codecs.SparseUpdate``).

        Raises:
            ValueError: ``weight`` is not a positive finite number.
        """
        if not (weight > 0 and np.isfinite(weight)):
            raise ValueError(f"update weight must be positive and finite, got {weight}")
        update.add_into(self.total, float(weight))
        self.weight += float(weight)
        self.count += 1

    def result(self) -> np.ndarray:
        """The weighted mean, float32 (d,).

        Raises:
            ValueError: nothing was added.
        """
        if self.count == 0:
            raise ValueError("weighted mean of zero updates")
        return (self.total / self.weight).astype(np.float32)


register_aggregator("weighted-mean", WeightedMean)
for _name, _factory in robust.RULES.items():
    register_aggregator(_name, _factory)


def model_delta(mean_update: np.ndarray, kind: str) -> np.ndarray:
    """The round's aggregated model change (``-pseudo-gradient``) from the mean client update.

    ``delta`` updates are model changes already; ``gradient`` updates are mean
    gradients, so the change is ``-mean`` (FedAvg with ``eta`` = learning rate is FedSGD).

    Args:
        mean_update: float32 (d,).
        kind: ``delta`` or ``gradient``.

    Raises:
        ValueError: unknown kind.
    """
    if kind == "delta":
        return mean_update
    if kind == "gradient":
        return -mean_update
    raise ValueError(f"update kind must be one of {UPDATE_KINDS}, got {kind!r}")

