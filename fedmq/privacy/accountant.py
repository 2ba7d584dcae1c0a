"""The privacy ledger: what each round spent, and the (epsilon, delta) it adds up to.

Nothing here computes a privacy bound itself: every epsilon comes from Google's
``dp-accounting`` (Rényi DP accountant, Mironov 2017; ``pip install dp-accounting``, in the
``coordinator`` extra; devices never import this module).

One :class:`RoundCharge` per round whose noisy aggregate was computed and committed to the
coordinator's checkpoint (docs/privacy.md, "When a round is charged"). Its event depends on
how the round's devices were sampled:

* ``poisson``: each of the ``population`` eligible devices took part independently with
  probability ``rate``; ``PoissonSampledDpEvent(rate, GaussianDpEvent(sigma))`` under
  add-or-remove-one neighbouring (the sum's L2 sensitivity is C, so the noise multiplier is
  ``sigma``); the standard analysis is tight.
* ``without-replacement``: ``sample`` of the ``population`` eligible devices were drawn
  uniformly without replacement (fedmq's default sampler);
  ``SampledWithoutReplacementDpEvent(population, sample, GaussianDpEvent(sigma / 2))`` under
  replace-one neighbouring (Wang, Balle and Kasiviswanathan 2019): replacing one device's data
  moves the sum by up to 2 C, so the noise multiplier is half of ``sigma``.

``sigma`` is the noise actually present on the round's sum, divided by C: the configured
noise multiplier under central noise; ``sqrt(survivors / expected) * sigma`` under distributed
noise, where devices that dropped out took their share with them.

A secure round under differential privacy (distributed discrete Gaussian noise,
:mod:`fedmq.privacy.discrete`) is charged ``ZCDpEvent(rho)`` instead, ``rho`` computed from
the survivors' noise actually present and the neighbouring relation's sensitivity (``C`` in
integers, twice that for replace-one); no amplification by sampling is claimed for it.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections import Counter
from dataclasses import asdict, dataclass, replace

import dp_accounting
from dp_accounting import rdp

from fedmq.errors import ConfigError, StateError

SAMPLINGS = ("poisson", "without-replacement")


class _QuietOrders(logging.Filter):
    """Drops dp-accounting's warning that a fractional Rényi order did not converge: the
    accountant leaves that order out of the minimum over orders (a valid, slightly looser
    bound), once per order per call, which would flood the coordinator's log every round."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in record.getMessage()


logging.getLogger("absl").addFilter(_QuietOrders())


@dataclass(frozen=True)
class RoundCharge:
    """The privacy spent by one round.

    Attributes:
        round: the round number.
        sampling: one of :data:`SAMPLINGS`.
        population: eligible devices the round sampled from.
        sample: devices selected (``without-replacement``; 0 for ``poisson``).
        rate: inclusion probability (``poisson``; 0.0 for ``without-replacement``).
        sigma: noise standard deviation on the round's sum over the clip norm (> 0).
        rho: zCDP parameter of a secure round's discrete noise (> 0), charged as such; 0.0
            for a round with Gaussian noise.
    """

    round: int
    sampling: str
    population: int
    sample: int
    rate: float
    sigma: float
    rho: float = 0.0

    def event(self) -> dp_accounting.DpEvent:
        """The ``dp-accounting`` event of this round (see the module docstring)."""
        if self.rho > 0:
            return dp_accounting.ZCDpEvent(self.rho)
        if self.sampling == "poisson":
            return dp_accounting.PoissonSampledDpEvent(self.rate, dp_accounting.GaussianDpEvent(self.sigma))
        return dp_accounting.SampledWithoutReplacementDpEvent(self.population, self.sample,
                                                              dp_accounting.GaussianDpEvent(self.sigma / 2))

    def check(self) -> RoundCharge:
        """Raises ValueError for a charge no accountant can take."""
        ok = (self.sampling in SAMPLINGS and self.population >= 1 and self.sigma > 0 and math.isfinite(self.sigma)
              and self.rho >= 0 and math.isfinite(self.rho)
              and (0 < self.rate <= 1 if self.sampling == "poisson" else 1 <= self.sample <= self.population))
        if not ok:
            raise ValueError(f"invalid privacy charge {self}")
        return self


def new_accountant(sampling: str) -> rdp.RdpAccountant:
    """A fresh RDP accountant with the neighbouring relation ``sampling``'s event needs."""
    relation = (dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE if sampling == "poisson"
                else dp_accounting.NeighboringRelation.REPLACE_ONE)
    return rdp.RdpAccountant(neighboring_relation=relation)


class PrivacyLedger:
    """Every round charged so far, and the epsilon they spend at ``delta``.

    Args:
        sampling: one of :data:`SAMPLINGS` (all charges use it: one neighbouring relation).
        delta: the delta epsilon is reported at.
        charges: charges of earlier runs (from :meth:`to_json`), oldest first.

    Identical charges are composed once as a self-composed event, so resuming a long ledger
    costs one accountant call per distinct round shape.

    Raises:
        ValueError: a charge of another sampling or an invalid one.
    """

    def __init__(self, sampling: str, delta: float, charges: tuple[RoundCharge, ...] | list[RoundCharge] = ()) -> None:
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
        self.sampling = sampling
        self.delta = float(delta)
        self.charges: list[RoundCharge] = []
        self._accountant = new_accountant(sampling)
        groups = Counter(replace(c.check(), round=0) for c in charges)
        for shape, count in groups.items():
            self._check_sampling(shape)
            self._accountant.compose(shape.event(), count)
        self.charges = list(charges)

    def _check_sampling(self, charge: RoundCharge) -> None:
        if charge.sampling != self.sampling:
            raise ValueError(f"round {charge.round} was charged with {charge.sampling} sampling, "
                             f"this ledger accounts {self.sampling}")

    @property
    def rounds_charged(self) -> int:
        return len(self.charges)

    def epsilon(self) -> float:
        """Epsilon spent so far at :attr:`delta` (0.0 before any charge)."""
        if not self.charges:
            return 0.0
        return float(self._accountant.get_epsilon(self.delta))

    def epsilon_after(self, charge: RoundCharge) -> float:
        """Epsilon the ledger would reach with ``charge`` added (nothing is recorded)."""
        self._check_sampling(charge.check())
        trial = copy.deepcopy(self._accountant)
        trial.compose(charge.event())
        return float(trial.get_epsilon(self.delta))

    def charge(self, charge: RoundCharge) -> float:
        """Record ``charge``; returns the epsilon spent now. A round already charged is not
        charged again (a resumed run replaying its last round)."""
        self._check_sampling(charge.check())
        if any(c.round == charge.round for c in self.charges):
            return self.epsilon()
        self._accountant.compose(charge.event())
        self.charges.append(charge)
        return self.epsilon()

    def to_json(self) -> str:
        """The charges as JSON (stored in the coordinator's checkpoint metadata)."""
        return json.dumps([asdict(c) for c in self.charges], sort_keys=True)

    @classmethod
    def from_json(cls, text: str, sampling: str, delta: float, where: str) -> PrivacyLedger:
        """The ledger :meth:`to_json` wrote. Raises StateError naming ``where`` when it cannot be read."""
        try:
            charges = [RoundCharge(**obj) for obj in json.loads(text)]
            return cls(sampling, delta, charges)
        except (ValueError, TypeError) as exc:
            raise StateError(f"{where}: the privacy ledger cannot be read: {exc}") from None


def calibrate_sigma(target_epsilon: float, delta: float, rounds: int, sampling: str, *, rate: float = 0.0,
                    population: int = 0, sample: int = 0, discrete: bool = False) -> float:
    """The smallest noise multiplier ``sigma`` for which ``rounds`` identical rounds spend at
    most ``target_epsilon`` at ``delta`` (``dp_accounting.calibrate_dp_mechanism``).

    Args:
        rate: inclusion probability (``poisson``); population, sample: devices eligible and
            selected per round (``without-replacement``).
        discrete: secure rounds with distributed discrete Gaussian noise: each round is
            ``ZCDpEvent(s^2 / (2 sigma^2))``, ``s`` = 1 (add-or-remove) or 2 (replace-one), the
            bound of :func:`fedmq.privacy.discrete.ddg_rho` once its tau is negligible (the
            charge of each round includes tau).

    Raises:
        ConfigError: no sigma up to 1e4 reaches the target.
    """
    def event(sigma: float) -> dp_accounting.DpEvent:
        if discrete:
            s = 1.0 if sampling == "poisson" else 2.0
            return dp_accounting.SelfComposedDpEvent(dp_accounting.ZCDpEvent(s * s / (2.0 * sigma * sigma)), rounds)
        charge = RoundCharge(0, sampling, max(population, 1), sample, rate, sigma).check()
        return dp_accounting.SelfComposedDpEvent(charge.event(), rounds)

    try:
        return float(dp_accounting.calibrate_dp_mechanism(
            lambda: new_accountant(sampling), event, target_epsilon, delta,
            dp_accounting.LowerEndpointAndGuess(0.05, 1.0), tol=1e-3))
    except (ValueError, dp_accounting.mechanism_calibration.NoBracketIntervalFoundError) as exc:
        raise ConfigError(f"no noise multiplier reaches epsilon {target_epsilon} at delta {delta} in {rounds} "
                          f"rounds ({sampling}): {exc}") from None
