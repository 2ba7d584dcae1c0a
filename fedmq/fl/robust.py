"""Byzantine-robust aggregation rules on sparse client updates.

Each rule is an :class:`fedmq.fl.aggregation.Aggregator` registered under its name and
chosen by ``[aggregation] rule``:

=====================  ==================================================================
``median``             coordinate-wise median (Yin et al. 2018, "Byzantine-Robust
                       Distributed Learning: Towards Optimal Statistical Rates")
``trimmed-mean``       coordinate-wise mean after cutting the ``trim`` fraction of the
                       largest and of the smallest values (Yin et al. 2018)
``krum``               the one update closest to its ``n - f - 2`` nearest neighbours
                       (Blanchard et al. 2017, "Machine Learning with Adversaries:
                       Byzantine Tolerant Gradient Descent")
``multi-krum``         the sample-weighted mean of the ``select`` best Krum scores
                       (Blanchard et al. 2017; default ``n - f``)
``centered-clipping``  ``v <- v + mean_i clip(x_i - v, tau)``, a few iterations
                       (Karimireddy et al. 2021, "Learning from History for Byzantine
                       Robust Optimization")
=====================  ==================================================================

**What a coordinate a device did not send counts as.** A Top-K update names the
coordinates it carries; the others were not sent, which is not the same as a sent zero
(SparseFed, Panda et al. 2022; SafeSparse 2025). The coordinate-wise rules take
``unsent``:

* ``"abstain"`` (default): a coordinate is aggregated over the updates that carry it;
  a coordinate no update carries does not move. At 1% density with 20 updates most
  coordinates are carried by a few updates, so a median over all 20 with the others as
  zeros would be zero almost everywhere and the global model would barely move
  (benchmarks/robust.py measures both);
* ``"zero"``: an unsent coordinate is a sent zero (the dense reading of the same vector).

Krum, Multi-Krum and centered clipping compare whole updates by Euclidean distance;
they read an update as the vector it would add to the model, unsent coordinates zero:
the distance between two updates is well defined only on one common reading.

**Memory.** The rules keep the round's updates as they were decoded (int64 indices and
float32 values per kept entry), so a round holds its updates times their kept entries,
never updates times the model size; the result, like the weighted mean's, is one
float32 ``(d,)`` vector, and Krum and centered clipping use one more model-sized scratch
vector. Dense updates (codec ``none``) keep ``d`` entries each.

**Weights.** The median, the trimmed mean, Krum and centered clipping ignore sample
counts: a weight is a claim the device makes, and a rule meant to bound what a few
devices can do must not let them buy influence by claiming more samples. Multi-Krum
averages the updates it selects weighted by samples, so with ``select`` = all it is the
weighted mean.

Sample weights must still be positive and finite (``ValueError`` otherwise), as for the
weighted mean.
"""

from __future__ import annotations

import math

import numpy as np

from fedmq.codecs import SparseUpdate
from fedmq.errors import ConfigError

#: ``unsent`` choices of the coordinate-wise rules (module docstring).
UNSENT_MODES = ("abstain", "zero")


class _KeptUpdates:
    """The round's decoded updates, kept as they are (sparse or dense) for a rule that
    needs all of them at once."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.updates: list[SparseUpdate] = []
        self.weights: list[float] = []
        self.count = 0

    def add(self, update: SparseUpdate, weight: float) -> None:
        """Keep ``update`` (a decoded, validated :class:`fedmq.codecs.SparseUpdate`).

        Raises:
            ValueError: ``weight`` is not a positive finite number.
        """
        if not (weight > 0 and np.isfinite(weight)):
            raise ValueError(f"update weight must be positive and finite, got {weight}")
        self.updates.append(update)
        self.weights.append(float(weight))
        self.count += 1

    def _require(self) -> None:
        if self.count == 0:
            raise ValueError(f"{type(self).__name__} of zero updates")

    def _entries(self) -> tuple[np.ndarray, np.ndarray]:
        """Every kept entry as ``(indices int64, values float64)``, the updates concatenated."""
        idx = [u.indices if u.indices is not None else np.arange(self.size, dtype=np.int64) for u in self.updates]
        return np.concatenate(idx), np.concatenate([u.values for u in self.updates]).astype(np.float64)


def _check_unsent(unsent: str) -> str:
    if unsent not in UNSENT_MODES:
        raise ConfigError(f"unsent must be one of {UNSENT_MODES}, got {unsent!r}")
    return unsent


class _Coordinatewise(_KeptUpdates):
    """Order statistics per coordinate over the kept entries, without a dense
    ``(updates, d)`` matrix: the entries are sorted by (coordinate, value) once; a
    coordinate's ``z`` implicit zeros (``unsent = "zero"``) sit between its negative and
    its non-negative values in that order, so rank ``r`` maps to a sorted entry or a zero."""

    def __init__(self, size: int, unsent: str = "abstain") -> None:
        super().__init__(size)
        self.unsent = _check_unsent(unsent)

    def _groups(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(coords, start, sent, zeros, negatives, values)``: per carried coordinate its
        first position in ``values`` (sorted by coordinate, then value), how many updates
        sent it, how many count as zeros, how many sent values are negative."""
        idx, val = self._entries()
        order = np.lexsort((val, idx))
        idx, val = idx[order], val[order]
        coords, start, sent = np.unique(idx, return_index=True, return_counts=True)
        zeros = (self.count - sent) if self.unsent == "zero" else np.zeros_like(sent)
        negatives = np.add.reduceat((val < 0).astype(np.int64), start) if len(start) else np.zeros(0, np.int64)
        return coords, start, sent, zeros, negatives, val

    @staticmethod
    def _at_rank(rank, start, zeros, negatives, val) -> np.ndarray:
        """The value of rank ``rank`` (0-based, per coordinate) among sent values and zeros."""
        in_zeros = (rank >= negatives) & (rank < negatives + zeros)
        pos = start + np.where(rank < negatives, rank, rank - zeros)
        return np.where(in_zeros, 0.0, val[np.where(in_zeros, start, pos)])


class CoordinateMedian(_Coordinatewise):
    """Coordinate-wise median (Yin et al. 2018); the mean of the two middle values for an
    even count.

    Args:
        size: number of model parameters ``d``.
        unsent: ``"abstain"`` or ``"zero"`` (module docstring).

    Raises:
        ConfigError: unknown ``unsent``.
    """

    def result(self) -> np.ndarray:
        """The median, float32 ``(d,)``. Raises ValueError when nothing was added."""
        self._require()
        out = np.zeros(self.size, dtype=np.float32)
        coords, start, sent, zeros, neg, val = self._groups()
        n = sent + zeros
        lo = self._at_rank((n - 1) // 2, start, zeros, neg, val)
        hi = self._at_rank(n // 2, start, zeros, neg, val)
        out[coords] = (lo + hi) / 2.0
        return out


class TrimmedMean(_Coordinatewise):
    """Coordinate-wise trimmed mean (Yin et al. 2018): of a coordinate's ``n`` values the
    ``floor(trim * n)`` largest and as many smallest are cut, the rest averaged.

    Args:
        size: number of model parameters ``d``.
        trim: fraction cut at each end, in [0, 0.5); it should exceed the fraction of
            Byzantine updates per round.
        unsent: ``"abstain"`` or ``"zero"`` (module docstring).

    Raises:
        ConfigError: ``trim`` outside [0, 0.5), unknown ``unsent``.
    """

    def __init__(self, size: int, trim: float = 0.2, unsent: str = "abstain") -> None:
        if not 0.0 <= trim < 0.5:
            raise ConfigError(f"trim must be in [0, 0.5), got {trim}")
        super().__init__(size, unsent)
        self.trim = float(trim)

    def result(self) -> np.ndarray:
        """The trimmed mean, float32 ``(d,)``. Raises ValueError when nothing was added."""
        self._require()
        out = np.zeros(self.size, dtype=np.float32)
        coords, start, sent, zeros, neg, val = self._groups()
        n = sent + zeros
        cut = np.floor(self.trim * n + 1e-9).astype(np.int64)
        # Each sent value's rank among its coordinate's values: its place among the sent
        # ones, moved past the zeros if it is not negative. Only the kept values are summed
        # (never a difference of running sums, which an attacker's 1e30 would swamp).
        group = np.repeat(np.arange(len(coords)), sent)
        local = np.arange(len(val)) - start[group]
        rank = np.where(local < neg[group], local, local + zeros[group])
        kept = (rank >= cut[group]) & (rank < (n - cut)[group])
        total = np.bincount(group, weights=np.where(kept, val, 0.0), minlength=len(coords))
        out[coords] = total / (n - 2 * cut)
        return out


def _tolerated(n: int, byzantine: float) -> int:
    """Byzantine updates tolerated among ``n`` at fraction ``byzantine``: at most the
    fraction, and at most what Krum allows (``n > 2f + 2``)."""
    return max(0, min(math.floor(byzantine * n + 1e-9), (n - 3) // 2))


def _squared_distances(updates: list[SparseUpdate], size: int) -> np.ndarray:
    """``(n, n)`` float64 squared Euclidean distances between updates read as vectors with
    unsent coordinates zero, from their inner products (one model-sized scratch vector)."""
    n = len(updates)
    scratch = np.zeros(size, dtype=np.float64)
    gram = np.zeros((n, n), dtype=np.float64)
    for i, u in enumerate(updates):
        where = u.indices if u.indices is not None else slice(None)
        scratch[where] = u.values
        for j in range(i, n):
            v = updates[j]
            theirs = scratch[v.indices] if v.indices is not None else scratch
            gram[i, j] = gram[j, i] = float(np.dot(theirs, v.values.astype(np.float64)))
        scratch[where] = 0.0
    sq = np.diag(gram)
    return np.maximum(sq[:, None] + sq[None, :] - 2.0 * gram, 0.0)


class MultiKrum(_KeptUpdates):
    """Multi-Krum (Blanchard et al. 2017): each update's score is the sum of its squared
    distances to its ``n - f - 2`` nearest other updates; the ``select`` updates with the
    lowest scores are averaged, weighted by samples. ``select = 1`` is Krum.

    ``f = min(floor(byzantine * n), floor((n - 3) / 2))`` for the ``n`` updates of the
    round (Krum needs ``n > 2f + 2``); with fewer than 3 updates every update scores 0
    and the first ``select`` in arrival order are taken.

    Args:
        size: number of model parameters ``d``.
        byzantine: fraction of the round's updates assumed Byzantine, in [0, 0.5).
        select: updates averaged; 0 means ``n - f`` (Blanchard et al.'s choice).

    Raises:
        ConfigError: ``byzantine`` outside [0, 0.5) or ``select`` < 0.
    """

    def __init__(self, size: int, byzantine: float = 0.2, select: int = 0) -> None:
        if not 0.0 <= byzantine < 0.5:
            raise ConfigError(f"byzantine must be in [0, 0.5), got {byzantine}")
        if select < 0:
            raise ConfigError(f"select must be >= 0, got {select}")
        super().__init__(size)
        self.byzantine = float(byzantine)
        self.select = int(select)
        #: positions (arrival order) of the updates the last :meth:`result` averaged.
        self.chosen: list[int] = []

    def scores(self) -> np.ndarray:
        """Krum score of each kept update, float64 ``(n,)``."""
        self._require()
        n = self.count
        f = _tolerated(n, self.byzantine)
        near = max(0, n - f - 2)
        dist = _squared_distances(self.updates, self.size)
        np.fill_diagonal(dist, np.inf)
        return np.sort(dist, axis=1)[:, :near].sum(axis=1)

    def result(self) -> np.ndarray:
        """The mean of the selected updates, float32 ``(d,)``. Raises ValueError when
        nothing was added."""
        scores = self.scores()
        n = self.count
        m = self.select or n - _tolerated(n, self.byzantine)
        self.chosen = [int(i) for i in np.argsort(scores, kind="stable")[:min(m, n)]]
        total = np.zeros(self.size, dtype=np.float64)
        weight = 0.0
        for i in self.chosen:
            self.updates[i].add_into(total, self.weights[i])
            weight += self.weights[i]
        return (total / weight).astype(np.float32)


class Krum(MultiKrum):
    """Krum (Blanchard et al. 2017): the one update with the lowest score (see
    :class:`MultiKrum`; ``select`` = 1)."""

    def __init__(self, size: int, byzantine: float = 0.2) -> None:
        super().__init__(size, byzantine, select=1)


class CenteredClipping(_KeptUpdates):
    """Centered clipping (Karimireddy et al. 2021): from ``v = 0`` (the global model not
    moving), ``iterations`` times ``v <- v + mean_i (x_i - v) min(1, tau / ||x_i - v||)``.

    The paper centres on the previous round's momentum with a fixed ``tau``; a fresh
    aggregator per round has no history, so here the centre starts at zero and, with
    ``clip_radius = 0``, ``tau`` is the median of the distances ``||x_i - v||`` at each
    iteration, which needs no tuning to the scale of the updates. Distances come from
    inner products with the dense centre (``O(kept entries)`` per update).

    Args:
        size: number of model parameters ``d``.
        clip_radius: ``tau`` in the units of the update (L2); 0 means the median distance.
        clip_iterations: iterations, >= 1.

    Raises:
        ConfigError: ``clip_radius`` < 0 or ``clip_iterations`` < 1.
    """

    def __init__(self, size: int, clip_radius: float = 0.0, clip_iterations: int = 3) -> None:
        if not clip_radius >= 0.0:
            raise ConfigError(f"clip_radius must be >= 0, got {clip_radius}")
        if clip_iterations < 1:
            raise ConfigError(f"clip_iterations must be >= 1, got {clip_iterations}")
        super().__init__(size)
        self.clip_radius = float(clip_radius)
        self.clip_iterations = int(clip_iterations)

    def result(self) -> np.ndarray:
        """The clipped centre, float32 ``(d,)``. Raises ValueError when nothing was added."""
        self._require()
        n = self.count
        sq = np.array([float(np.dot(u.values.astype(np.float64), u.values)) for u in self.updates])
        v = np.zeros(self.size, dtype=np.float64)
        for _ in range(self.clip_iterations):
            vv = float(np.dot(v, v))
            dots = np.array([float(np.dot(v[u.indices] if u.indices is not None else v, u.values)) for u in self.updates])
            dist = np.sqrt(np.maximum(sq + vv - 2.0 * dots, 0.0))
            tau = self.clip_radius or float(np.median(dist))
            scale = np.where(dist > tau, tau / np.maximum(dist, 1e-300), 1.0)
            # mean_i s_i (x_i - v) = (1/n) sum_i s_i x_i - v mean(s): v stays the only dense term.
            step = np.zeros(self.size, dtype=np.float64)
            for u, s in zip(self.updates, scale):
                u.add_into(step, float(s) / n)
            v = v * (1.0 - float(scale.mean())) + step
        return v.astype(np.float32)


#: The rules of this module by their ``[aggregation] rule`` names (registered by
#: :mod:`fedmq.fl.aggregation`, which imports this module: the import runs one way).
RULES = {"median": CoordinateMedian, "trimmed-mean": TrimmedMean, "krum": Krum, "multi-krum": MultiKrum,
         "centered-clipping": CenteredClipping}
