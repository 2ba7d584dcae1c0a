"""Schedules of a codec's parameters over rounds, applied the same way to the uplink plan and
the downlink.

A schedule maps (a :class:`~fedmq.codecs.CodecSpec`, a round) to the spec that round uses;
it never names a codec: it moves the parameter the codec's ``Params`` declares as its
density (``density_param``), and leaves a codec without one (``none``) as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedmq.codecs.base import CodecSpec
from fedmq.errors import CodecError


@dataclass(frozen=True)
class DensityWarmup:
    """Density warm-up (Lin et al. 2018, "Deep Gradient Compression", arXiv 1712.01887:
    sparsity raised exponentially over the first epochs): for the first ``rounds`` rounds
    the density goes geometrically from ``start`` in round 1 down to the codec's own value,
    which it keeps from round ``rounds + 1`` on.

    Fields:
        rounds: rounds of warm-up, >= 0 (0: off).
        start: density of round 1, in (0, 1]; no warm-up when it is not above the codec's.

    Raises:
        CodecError: a field out of range.
    """

    rounds: int = 0
    start: float = 0.25

    def __post_init__(self) -> None:
        if self.rounds < 0 or not 0.0 < self.start <= 1.0:
            raise CodecError(f"density warm-up: rounds >= 0 and start in (0, 1] expected, got {self.rounds}, "
                             f"{self.start}")

    def density(self, target: float, round_: int) -> float:
        """Density of round ``round_`` (from 1) for a codec whose own density is ``target``."""
        if self.rounds <= 0 or round_ > self.rounds or self.start <= target:
            return target
        return float(self.start * (target / self.start) ** ((round_ - 1) / self.rounds))

    def apply(self, spec: CodecSpec, round_: int) -> CodecSpec:
        """The codec spec round ``round_`` uses: ``spec`` with its density parameter scheduled
        (``spec`` itself when the codec has none, or outside the warm-up)."""
        name = spec.params.density_param
        if name is None:
            return spec
        density = self.density(spec.density, round_)
        return spec if density == spec.density else spec.with_params(**{name: density})
