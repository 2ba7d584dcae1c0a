"""The coordinator's differential privacy: sampling, noise, clip norm, budget and ledger of a run.

:class:`PrivacyGuard` is the one object the round driver (``coordinator/driver.py``) asks, at a
few points of a round, what DP-FedAvg (McMahan et al. 2018) needs:

* selecting (:meth:`PrivacyGuard.select`): ``poisson`` sampling (each eligible device with
  probability ``q``) or the coordinator's uniform sampling without replacement, both from a
  generator seeded with operating-system entropy (``[privacy] noise_seed`` in tests), then
  :meth:`PrivacyGuard.admits`: a round that would spend past ``[privacy] target_epsilon`` is
  not opened;
* the task's plan carries the clip norm and, under distributed noise, each device's noise
  share (:meth:`PrivacyGuard.plan`);
* the round's aggregate is :class:`fedmq.privacy.aggregation.NoisySum` (uniform weights, noise,
  fixed denominator) and its checks reject an update whose decoded norm is above the clip norm
  (:class:`PrivacyChecks`: under DP the clip norm replaces the data-set norm bound);
* secure rounds (``[secure_aggregation] enabled``, ``noise = "distributed"``): no update is
  seen, so none is checked or noised here; each device clips its input to the clip norm and
  adds discrete Gaussian noise of :meth:`PrivacyGuard.discrete_std` (its setup says how much),
  the mean divides the survivors' sum by the fixed :attr:`PrivacyGuard.denominator`, and the
  charge is the zCDP of the survivors' noise (:mod:`fedmq.privacy.discrete`);
* closing (:meth:`PrivacyGuard.charge`): the round is charged in the ledger, and adaptive
  clipping (Andrew et al. 2021, "Differentially Private Learning with Adaptive Clipping") moves
  the clip norm towards the ``target_quantile`` of update norms from a noisy count.

**When a round is charged**: when its noisy aggregate was computed, in the same checkpoint
(``privacy`` metadata) that makes the round's new global model durable. The checkpoint is
written before the model is published, so a run killed before it (the round is rerun) never
released that aggregate and is charged nothing for it; after it, the charge is on disk with
the model. A round that fails with fewer than ``min_updates`` computes no aggregate and is
free; one whose noisy model the gate refuses is charged (its failure depends on the noise).
"""

from __future__ import annotations

import json
import logging
import math
import secrets
from dataclasses import replace

import numpy as np

from coordinator.config import CoordinatorConfig
from fedmq.wire.envelope import ClientUpdate
from fedmq.errors import ConfigError, StateError
from fedmq.fl.rounds import Accepted, Rejected, UpdateChecks
from fedmq.fl.sampling import round_rng, select_devices
from fedmq.wire.messages import TrainPlan
from fedmq.model.params import ParamSpec
from fedmq.privacy.accountant import PrivacyLedger, RoundCharge, calibrate_sigma
from fedmq.privacy.aggregation import NoisySum
from fedmq.privacy.discrete import MIN_STD, ddg_rho, l2_sensitivity

log = logging.getLogger("fedmq.coordinator.privacy")

#: Tail allowance of a noise share's L2 norm, in standard deviations beyond sqrt(d): the
#: norm of d Gaussian coordinates exceeds std (sqrt(d) + t) with probability below exp(-t^2 / 2).
_NOISE_TAIL = 10.0
#: Metric a device reports under DP: 1.0 when its update was within the clip norm before clipping.
UNCLIPPED = "dp_unclipped"


class PrivacyChecks(UpdateChecks):
    """:class:`fedmq.fl.rounds.UpdateChecks` under DP: the norm bound is the guard's current
    bound (the clip norm; plus the noise share's tail under distributed noise), and with
    adaptive clipping an update must report its ``dp_unclipped`` bit as 0.0 or 1.0
    (``malformed`` otherwise); the bits of accepted updates are counted for the guard."""

    def __init__(self, guard: PrivacyGuard, **kwargs: object) -> None:
        super().__init__(norm_bound=guard.norm_bound(), norm_factor=None, **kwargs)  # type: ignore[arg-type]
        self.guard = guard
        self._bit = 0.0

    def check(self, upd: ClientUpdate, spec: ParamSpec, kind: str) -> Accepted | Rejected:
        self.norm_bound = self.guard.norm_bound()
        bit = upd.metrics.get(UNCLIPPED, 0.0)
        if self.guard.adaptive and bit not in (0.0, 1.0):
            return Rejected("malformed", f"metric {UNCLIPPED} must be 0 or 1, got {bit}", upd, upd.round)
        outcome = super().check(upd, spec, kind)
        self._bit = bit
        return outcome

    def accepted(self, norm: float) -> None:
        super().accepted(norm)
        self.guard.unclipped += self._bit


class PrivacyGuard:
    """Differential privacy of one coordinator run (module docstring).

    Args:
        config: the coordinator's configuration (``[privacy] enabled``).
        spec: the global model's ParamSpec (``d``, for the distributed noise's norm allowance).

    Attributes:
        sigma: the noise multiplier (configured or calibrated at start).
        clip_norm: the clip norm in force (moves under adaptive clipping).
        ledger: the rounds charged (:class:`fedmq.privacy.accountant.PrivacyLedger`).
        unclipped: ``dp_unclipped`` bits of the open round's accepted updates.
        exhausted: set when a round was not opened for the budget (the reason).

    Raises:
        ConfigError: no noise multiplier reaches the target (calibration), calibration lacks
            ``sampling_rate`` / ``population``, or a configured ``count_stddev`` is not above
            sigma / 2 (adaptive clipping).
    """

    def __init__(self, config: CoordinatorConfig, spec: ParamSpec) -> None:
        p = config.privacy
        self.cfg = p
        # Amplification by sampling holds only for a sample nobody outside the coordinator can
        # predict: not the configuration's seed (a restarted coordinator samples afresh, which a
        # data-independent selection allows; the round is still charged once).
        self._sampling_seed = p.noise_seed if p.noise_seed is not None else secrets.randbits(64)
        self.policy = config.round.participation()
        self.size = spec.size
        self.adaptive = p.adaptive_clipping
        self.clip_norm = p.clip_norm
        #: Secure rounds: the devices add distributed discrete Gaussian noise to their integer
        #: inputs (fedmq.privacy.discrete) at the ring's scale (integers per update unit).
        self.secure = config.secure_aggregation.enabled
        self._scale = config.secure_aggregation.scale
        self.sigma = p.noise_multiplier if p.noise_multiplier is not None else self._calibrate(config)
        self.ledger = PrivacyLedger(p.sampling, p.delta)
        self.unclipped = 0.0
        self.exhausted = ""
        self._rng = np.random.default_rng(p.noise_seed if p.noise_seed is not None else secrets.randbits(128))
        self._population = 0
        self._selected = 0
        self._rate = 0.0
        self._denominator = 1.0
        self._check_adaptive()
        if config.downlink.compressed:
            # [downlink] named a compressed codec (under DP the default is "none"). Measured
            # (BENCHMARKS.md, "Privacy"): the MNIST CNN at epsilon 8, 100 devices per round,
            # reached 26.1% with the compressed downlink and 87.05% with a dense one.
            log.warning("differential privacy with the compressed downlink named in [downlink] (%s): its Top-K "
                        "of a noisy global step keeps mostly noise on a large model (BENCHMARKS.md, \"Privacy\"); "
                        "without a codec named, DP runs publish dense versions", config.downlink.codec.name)
        log.info("differential privacy: %s noise, sigma %.4g, clip norm %.4g, %s sampling, delta %g, budget %s",
                 p.noise, self.sigma, self.clip_norm, p.sampling, p.delta,
                 "none" if p.target_epsilon is None else f"epsilon {p.target_epsilon}")

    def _calibrate(self, config: CoordinatorConfig) -> float:
        p = config.privacy
        rounds = p.rounds or config.rounds
        if p.target_epsilon is None:
            raise ConfigError(f"{config.where('privacy.target_epsilon')}: needed to calibrate the noise multiplier "
                              f"(no noise_multiplier is set)")
        if p.sampling == "poisson":
            if p.sampling_rate is None:
                raise ConfigError(f"{config.where('privacy.sampling_rate')}: needed to calibrate the noise "
                                  f"multiplier from target_epsilon with poisson sampling")
            return calibrate_sigma(p.target_epsilon, p.delta, rounds, "poisson", rate=p.sampling_rate,
                                   discrete=self.secure)
        if self.secure:
            return calibrate_sigma(p.target_epsilon, p.delta, rounds, "without-replacement", discrete=True)
        if p.population is None:
            raise ConfigError(f"{config.where('privacy.population')}: needed to calibrate the noise multiplier from "
                              f"target_epsilon with sampling without replacement")
        return calibrate_sigma(p.target_epsilon, p.delta, rounds, "without-replacement", population=p.population,
                               sample=self.policy.selection_size(p.population))

    # -- checkpoint ----------------------------------------------------------------------

    def meta(self) -> str:
        """The ledger and the clip norm as JSON (the checkpoint's ``privacy`` metadata)."""
        return json.dumps({"ledger": json.loads(self.ledger.to_json()), "clip_norm": self.clip_norm,
                           "sigma": self.sigma}, sort_keys=True)

    def restore(self, text: str | None, where: str) -> None:
        """Resume from :meth:`meta` (None: a checkpoint written before DP: nothing charged).

        Raises:
            StateError: unreadable metadata (``where`` names the file)."""
        if text is None:
            return
        try:
            obj = json.loads(text)
            self.ledger = PrivacyLedger.from_json(json.dumps(obj["ledger"]), self.cfg.sampling, self.cfg.delta, where)
            self.clip_norm = float(obj["clip_norm"])
        except (ValueError, TypeError, KeyError) as exc:
            raise StateError(f"{where}: bad 'privacy' metadata: {exc}") from None

    def summary(self) -> dict[str, object]:
        """What a run summary (``summary.json``) says about its privacy."""
        return {"epsilon": self.epsilon, "delta": self.cfg.delta, "noise_multiplier": self.sigma,
                "clip_norm": self.clip_norm, "noise": self.cfg.noise, "sampling": self.cfg.sampling,
                "rounds_charged": self.ledger.rounds_charged, "target_epsilon": self.cfg.target_epsilon,
                "budget_exhausted": self.exhausted or None}

    def model_metadata(self) -> dict[str, str]:
        """The (epsilon, delta) of the global model as published now, for its ONNX export."""
        return model_metadata(self.epsilon, self.cfg.delta, self.sigma, self.ledger.rounds_charged)

    # -- a round -------------------------------------------------------------------------

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far at ``[privacy] delta``."""
        return self.ledger.epsilon()

    def select(self, eligible: list[str], round_: int) -> tuple[list[str], int]:
        """The round's selection and target (accepted updates that close it early)."""
        n = len(eligible)
        self._population = n
        if self.cfg.sampling == "poisson":
            rate = self.cfg.sampling_rate or min(1.0, self.policy.selection_size(n) / max(n, 1))
            pool = sorted(set(eligible))
            picks = round_rng(self._sampling_seed, round_).random(len(pool)) < rate
            selected = [d for d, hit in zip(pool, picks) if hit]
            self._rate, self._selected = rate, len(selected)
            self._denominator = max(rate * n, 1.0)
            return selected, len(selected)
        selected = select_devices(eligible, self.policy, self._sampling_seed, round_)
        self._rate, self._selected = 0.0, len(selected)
        target = min(self.policy.target(n), len(selected))
        self._denominator = float(max(target, 1))
        return selected, target

    def _charge_for(self, round_: int, sigma: float, survivors: float | None = None) -> RoundCharge:
        """The round's charge; a secure round's is the zCDP of its discrete noise with
        ``survivors`` devices' shares in the sum (default: the expected count)."""
        rho = 0.0
        if self.secure:
            devices = max(1, round(self._denominator if survivors is None else survivors))
            std = self.discrete_std()
            # Replacing one device's data moves the sum by up to twice what adding one does.
            l2 = l2_sensitivity(self.clip_norm, self._scale) * (1.0 if self.cfg.sampling == "poisson" else 2.0)
            rho = ddg_rho(l2, std, devices, self.size)
            sigma = math.sqrt(devices) * std / l2_sensitivity(self.clip_norm, self._scale)
        return RoundCharge(round_, self.cfg.sampling, max(self._population, 1),
                           self._selected if self.cfg.sampling != "poisson" else 0,
                           self._rate if self.cfg.sampling == "poisson" else 0.0, sigma, rho)

    @property
    def denominator(self) -> float:
        """The fixed denominator of the open round's mean: its expected participants."""
        return self._denominator

    def discrete_std(self) -> float:
        """A device's discrete Gaussian noise in a secure round, standard deviation in integers:
        ``sigma * scale * C / sqrt(expected participants)`` (at least
        :data:`fedmq.privacy.discrete.MIN_STD`), so that the expected participants' noise
        sums to ``sigma`` times the sensitivity ``scale * C``."""
        std = self.sigma * l2_sensitivity(self.clip_norm, self._scale) / math.sqrt(self._denominator)
        return max(MIN_STD, std)

    def admits(self, round_: int) -> bool:
        """Whether round ``round_`` (as :meth:`select` just drew it) stays within the budget;
        when not, :attr:`exhausted` says why (logged)."""
        budget = self.cfg.target_epsilon
        if budget is None or self._selected == 0:
            return True
        after = self.ledger.epsilon_after(self._charge_for(round_, self.sigma))
        if after <= budget:
            return True
        self.exhausted = (f"round {round_} would spend epsilon {after:.4g} > the budget {budget:g} at delta "
                          f"{self.cfg.delta:g} (spent {self.epsilon:.4g} in {self.ledger.rounds_charged} rounds)")
        log.warning("privacy budget reached: %s; no round opened, stopping", self.exhausted)
        return False

    def plan(self, plan: TrainPlan) -> TrainPlan:
        """The round's plan with its clip norm and, under distributed noise, the device's noise share."""
        share = self.sigma * self.clip_norm / math.sqrt(self._denominator) if self.cfg.noise == "distributed" else 0.0
        if self.secure:
            share = 0.0  # the secure round's setup carries the noise (sa_setup_dp), not the plan
        return replace(plan, clip_norm=self.clip_norm, noise_std=share)

    def norm_bound(self) -> float:
        """Largest decoded L2 norm accepted: the clip norm, plus the noise share's tail under distributed noise."""
        if self.cfg.noise != "distributed":
            return self.clip_norm
        share = self.sigma * self.clip_norm / math.sqrt(self._denominator)
        return self.clip_norm + share * (math.sqrt(self.size) + _NOISE_TAIL)

    def _update_sigma(self) -> float:
        """The noise multiplier of the updates' own noise: sigma, less what the count's noise
        already provides under adaptive clipping (Andrew et al. 2021, Theorem 1)."""
        if not self.adaptive:
            return self.sigma
        count_std = self._count_std()
        return (self.sigma ** -2 - (2 * count_std) ** -2) ** -0.5

    def _count_std(self) -> float:
        # Andrew et al. suggest m / 20; at least sigma, so that the updates' own noise stays
        # within 1.16 sigma on a small fleet.
        return self.cfg.count_stddev if self.cfg.count_stddev is not None else max(self._denominator / 20.0, self.sigma)

    def aggregator(self, size: int) -> NoisySum:
        """The round's aggregate (the round engine's aggregator factory)."""
        self.unclipped = 0.0
        std = 0.0 if self.cfg.noise == "distributed" else self._update_sigma() * self.clip_norm
        return NoisySum(size, noise_std=std, denominator=self._denominator, rng=self._rng)

    def _check_adaptive(self) -> None:
        """Raises ConfigError when the configured count noise is too small for adaptive clipping
        (2 count_stddev <= sigma)."""
        if self.adaptive and self.cfg.count_stddev is not None and 2 * self.cfg.count_stddev <= self.sigma:
            raise ConfigError(f"privacy: adaptive clipping needs count_stddev > sigma / 2 = {self.sigma / 2:.4g}, "
                              f"got {self._count_std():.4g}")

    def charge(self, round_: int, accepted: int) -> float:
        """Charge round ``round_``, whose noisy aggregate of ``accepted`` updates was computed,
        then move the clip norm (adaptive clipping). Returns the epsilon spent now."""
        sigma = self.sigma
        if self.cfg.noise == "distributed":
            # Devices that dropped out took their noise share with them.
            sigma = self.sigma * math.sqrt(accepted / self._denominator)
        eps = self.ledger.charge(self._charge_for(round_, sigma, survivors=accepted))
        if self.adaptive:
            # Centered bits (b - 1/2): the count's sensitivity is 1/2 (Andrew et al. 2021, Alg. 1).
            noisy = self.unclipped - accepted / 2 + self._rng.normal(0.0, self._count_std())
            fraction = noisy / self._denominator + 0.5
            self.clip_norm *= math.exp(-self.cfg.clip_learning_rate * (fraction - self.cfg.target_quantile))
        return eps


def model_metadata(epsilon: float, delta: float, sigma: float, rounds: int) -> dict[str, str]:
    """String metadata of a model trained with differential privacy (ONNX ``metadata_props``):
    ``dp_epsilon``, ``dp_delta``, ``dp_noise_multiplier``, ``dp_rounds_charged``."""
    return {"dp_epsilon": f"{epsilon:.6g}", "dp_delta": f"{delta:g}", "dp_noise_multiplier": f"{sigma:.6g}",
            "dp_rounds_charged": str(rounds)}


def checkpoint_privacy(config: CoordinatorConfig, meta: dict[str, str], where: str) -> dict[str, str] | None:
    """The privacy metadata of a checkpoint (its ``privacy`` metadata, for ``[privacy]`` of
    ``config``), or None when the checkpoint was not trained with differential privacy.

    Raises:
        StateError: unreadable metadata (``where`` names the file)."""
    text = meta.get("privacy")
    if text is None:
        return None
    try:
        obj = json.loads(text)
        ledger = PrivacyLedger.from_json(json.dumps(obj["ledger"]), config.privacy.sampling, config.privacy.delta,
                                         where)
        sigma = float(obj["sigma"])
    except (ValueError, TypeError, KeyError) as exc:
        raise StateError(f"{where}: bad 'privacy' metadata: {exc}") from None
    return model_metadata(ledger.epsilon(), config.privacy.delta, sigma, ledger.rounds_charged)
