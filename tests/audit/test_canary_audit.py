"""Empirical privacy audit: a canary's epsilon, measured through the real DP step, stays below
the accountant's, and a planted bug (noise halved) is caught.

Each world (canary in / canary out) releases TRIALS independent canary coordinates through
``PoissonBatchSampler`` -> ``make_private`` clipping -> ``PrivateTraining.noise_and_normalize``
(see tests/canary.py for exactly what runs and why folding trials into one step is faithful).
A threshold test on the coordinate gives false-positive / false-negative rates, and
Clopper-Pearson bounds turn them into a 95%-confidence lower bound on epsilon
(tests/epsilon_bounds.py). The claim audited is the tight PLD epsilon of what the step charged
to its ledger, which is smaller than the ledger's own RDP figure: a stricter test.

Sizes: at a claimed epsilon of ~2 (q = 0.5), 3*10^5 trials per world put the correct
implementation's bound at 0.4-1.4 and the halved-noise bound at 2.9-3.4 over six seeds tried
while writing this test, so both assertions hold with a wide margin; the seeds are fixed.
"""

from __future__ import annotations

import pytest
from canary import AuditSetup, release_canary_coordinates
from epsilon_bounds import audit_epsilon

from lightning_dp.accounting import epsilon
from lightning_dp.strategies import private_training

DELTA = 1e-5
TRIALS = 300_000
POISSON = AuditSetup(noise_multiplier=1.5, sample_rate=0.5)  # claimed epsilon ~2.02


def audit(setup: AuditSetup, trials: int, seed: int = 0) -> tuple[float, float]:
    """(empirical 95% lower bound, accountant's PLD epsilon) for one step of ``setup``."""
    inside, training = release_canary_coordinates(setup, trials, with_canary=True, seed=seed)
    outside, _ = release_canary_coordinates(setup, trials, with_canary=False, seed=seed + 1)
    (charged,) = training.ledger.history
    assert (charged.noise_multiplier, charged.sample_rate, charged.count) == (
        setup.noise_multiplier, setup.sample_rate, 1)
    claimed = epsilon(noise_multiplier=charged.noise_multiplier, sample_rate=charged.sample_rate,
                      steps=charged.count, delta=DELTA, accountant="pld")
    return audit_epsilon(outside, inside, delta=DELTA, confidence=0.95), claimed


def plant_halved_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    """Planted bug: the step draws noise with sigma/2 while the ledger charges sigma."""
    real = private_training.add_noise_and_normalize

    def halved(params, *, noise_multiplier: float, **kwargs) -> None:
        real(params, noise_multiplier=noise_multiplier / 2, **kwargs)

    monkeypatch.setattr(private_training, "add_noise_and_normalize", halved)


@pytest.fixture
def halved_noise(monkeypatch):
    plant_halved_noise(monkeypatch)


def test_measured_epsilon_stays_below_the_accountants():
    measured, claimed = audit(POISSON, TRIALS)
    assert 0.25 < measured < claimed, (measured, claimed)  # > 0.25: the audit sees the canary


def test_halved_noise_is_caught(halved_noise):
    measured, claimed = audit(POISSON, TRIALS)
    assert measured > claimed, (measured, claimed)


@pytest.mark.slow
@pytest.mark.parametrize("setup", [
    AuditSetup(noise_multiplier=2.0, sample_rate=1.0),  # no subsampling, claimed epsilon ~2
    AuditSetup(noise_multiplier=1.4, sample_rate=1.0),  # claimed epsilon ~3
    AuditSetup(noise_multiplier=1.13, sample_rate=0.5),  # claimed epsilon ~3
], ids=["q1-eps2", "q1-eps3", "q0.5-eps3"])
@pytest.mark.parametrize("seed", [10, 20])
def test_audit_more_settings(setup, seed, monkeypatch):
    measured, claimed = audit(setup, TRIALS, seed)
    assert measured < claimed, (measured, claimed)
    plant_halved_noise(monkeypatch)
    measured, claimed = audit(setup, TRIALS, seed)
    assert measured > claimed, (measured, claimed)
