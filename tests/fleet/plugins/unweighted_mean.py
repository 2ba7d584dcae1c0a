"""A test-only aggregation rule: every accepted update counts the same, whatever its samples."""

from __future__ import annotations

import numpy as np

from fedmq.fl.aggregation import register_aggregator


class UnweightedMean:
    def __init__(self, size: int) -> None:
        self.total = np.zeros(size, dtype=np.float64)
        self.count = 0

    def add(self, update, weight: float) -> None:
        update.add_into(self.total, 1.0)
        self.count += 1

    def result(self) -> np.ndarray:
        if self.count == 0:
            raise ValueError("mean of zero updates")
        return (self.total / self.count).astype(np.float32)


register_aggregator("test-unweighted-mean", UnweightedMean)
