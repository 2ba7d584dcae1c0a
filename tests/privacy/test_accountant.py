"""The privacy ledger against independent dp-accounting computations, and calibration."""

from __future__ import annotations

import dp_accounting
import pytest
from dp_accounting import rdp

from fedmq.errors import StateError
from fedmq.privacy.accountant import PrivacyLedger, RoundCharge, calibrate_sigma


def test_poisson_ledger_equals_an_independent_computation_of_the_same_events() -> None:
    ledger = PrivacyLedger("poisson", 1e-5)
    charges = [RoundCharge(r, "poisson", 1000, 0, 0.1, 1.0 if r <= 20 else 0.8) for r in range(1, 31)]
    for c in charges:
        ledger.charge(c)
    independent = rdp.RdpAccountant()
    independent.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.0)), 20))
    independent.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(0.8)), 10))
    assert ledger.epsilon() == pytest.approx(independent.get_epsilon(1e-5), rel=1e-9)


def test_without_replacement_charges_the_replace_one_event_with_twice_the_sensitivity() -> None:
    ledger = PrivacyLedger("without-replacement", 1e-5)
    for r in range(1, 6):
        ledger.charge(RoundCharge(r, "without-replacement", 1000, 100, 0.0, 2.0))
    independent = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    independent.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.SampledWithoutReplacementDpEvent(1000, 100, dp_accounting.GaussianDpEvent(1.0)), 5))
    assert ledger.epsilon() == pytest.approx(independent.get_epsilon(1e-5), rel=1e-9)


def test_a_round_counts_once_and_the_ledger_survives_json() -> None:
    ledger = PrivacyLedger("poisson", 1e-5)
    c1, c2 = RoundCharge(1, "poisson", 50, 0, 0.2, 1.5), RoundCharge(2, "poisson", 49, 0, 0.2, 1.5)
    ledger.charge(c1)
    eps1 = ledger.epsilon()
    assert ledger.charge(c1) == eps1 and ledger.rounds_charged == 1
    assert ledger.epsilon_after(c2) > eps1 and ledger.rounds_charged == 1
    ledger.charge(c2)
    again = PrivacyLedger.from_json(ledger.to_json(), "poisson", 1e-5, "test")
    assert again.charges == ledger.charges and again.epsilon() == ledger.epsilon()
    with pytest.raises(StateError, match="test"):
        PrivacyLedger.from_json('[{"round": 1}]', "poisson", 1e-5, "test")
    with pytest.raises(StateError):
        PrivacyLedger.from_json(ledger.to_json(), "without-replacement", 1e-5, "test")


def test_calibrated_sigma_meets_the_target_epsilon() -> None:
    sigma = calibrate_sigma(3.0, 1e-5, 30, "poisson", rate=0.1)
    ledger = PrivacyLedger("poisson", 1e-5, [RoundCharge(r, "poisson", 1000, 0, 0.1, sigma) for r in range(1, 31)])
    assert 2.9 < ledger.epsilon() <= 3.0
