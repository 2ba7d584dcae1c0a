"""Who takes part in a round: uniform sampling with over-selection.

Production FL over-selects (about 130%) and closes the round with the first devices to
report (Bonawitz et al. 2019, "Towards Federated Learning at Scale"). The random
generator of round ``r`` is derived from ``(seed, r)``, so a restarted coordinator
selects exactly what an uninterrupted one would, with no generator state to save.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np


def round_rng(seed: int, round_: int) -> np.random.Generator:
    """The random generator of one round, a pure function of ``(seed, round)``."""
    return np.random.default_rng([int(seed), int(round_)])


@dataclass(frozen=True)
class SelectionPolicy:
    """How many devices a round wants.

    Attributes:
        devices_per_round: an int >= 1 (a count) or a float in (0, 1] (a fraction of the
            eligible devices, rounded up); the round closes early once this many client
            updates are accepted (its *target*).
        min_updates: fewest accepted updates for a round to succeed at its deadline.
        over_selection: factor >= 1 applied to the target when selecting, default 1.0 (over-selecting and closing on the first
            answers biases participation towards fast devices; docs/coordinator.md).
    """

    devices_per_round: int | float
    min_updates: int = 1
    over_selection: float = 1.0

    def target(self, eligible: int) -> int:
        """Accepted updates that close the round early, given ``eligible`` devices."""
        if isinstance(self.devices_per_round, float):
            return max(1, math.ceil(self.devices_per_round * eligible))
        return int(self.devices_per_round)

    def selection_size(self, eligible: int) -> int:
        """Devices to send a task to: ``ceil(target * over_selection)``, at most ``eligible``."""
        return min(eligible, math.ceil(self.target(eligible) * self.over_selection - 1e-9))


def select_devices(eligible: Iterable[str], participation: SelectionPolicy, seed: int, round_: int) -> list[str]:
    """Sample devices uniformly without replacement for ``round_``.

    Args:
        eligible: ids of online devices whose ParamSpec matches the global model.
        participation: target and over-selection.
        seed, round_: derive the round's generator (:func:`round_rng`).

    Returns:
        The selected ids, in selection order; the same inputs give the same list whatever
        order ``eligible`` comes in.
    """
    pool = sorted(set(eligible))
    k = participation.selection_size(len(pool))
    if k == 0:
        return []
    picks = round_rng(seed, round_).choice(len(pool), size=k, replace=False)
    return [pool[i] for i in picks]
