"""The released canary coordinate follows the Poisson-subsampled Gaussian mixture.

In units of C/(qN) the canary coordinate of the released update is
``(1 - q) N(0, sigma^2) + q N(1, sigma^2)``: the canary (clipped to exactly C) is sampled with
probability q, the noise has std sigma*S with S = C, and the sum is divided by the expected
batch size qN. Raw, that is ``(1 - q) N(0, s^2) + q N(C/(qN), s^2)`` with s = sigma*C/(qN).
Kolmogorov-Smirnov tests with fixed seeds; each has negative controls that must reject a wrong
sigma or a missing subsampling, so the test can fail.
"""

from __future__ import annotations

import numpy as np
import pytest
from canary import AuditSetup, release_canary_coordinates, release_one_step_at_a_time
from scipy import stats

ALPHA = 1e-3  # seeded: a fixed outcome; a correct implementation passes comfortably
SETUP = AuditSetup(noise_multiplier=1.0, sample_rate=0.5)


def mixture_cdf(sigma: float, q: float):
    """CDF of (1 - q) N(0, sigma^2) + q N(1, sigma^2)."""
    return lambda z: (1 - q) * stats.norm.cdf(z, scale=sigma) + q * stats.norm.cdf(z, loc=1, scale=sigma)


def ks_pvalue(sample: np.ndarray, sigma: float, q: float) -> float:
    return stats.kstest(sample, mixture_cdf(sigma, q)).pvalue


@pytest.fixture(scope="module")
def folded() -> np.ndarray:
    return release_canary_coordinates(SETUP, 50_000, with_canary=True, seed=3)[0]


def test_canary_coordinate_is_the_subsampled_gaussian_mixture(folded):
    sigma, q = SETUP.noise_multiplier, SETUP.sample_rate
    assert ks_pvalue(folded, sigma, q) > ALPHA
    # Negative controls. With 5*10^4 samples KS detects a CDF gap of ~0.009 at ALPHA; a 10%
    # error in sigma opens a gap of ~0.02, a missing subsampling one of ~0.19.
    assert ks_pvalue(folded, sigma * 1.1, q) < ALPHA
    assert ks_pvalue(folded, sigma / 1.1, q) < ALPHA
    assert ks_pvalue(folded, sigma, 1.0) < ALPHA  # canary always in: no subsampling
    assert ks_pvalue(folded, sigma, 0.0) < ALPHA  # canary never in


def test_without_the_canary_it_is_pure_noise():
    outside = release_canary_coordinates(SETUP, 50_000, with_canary=False, seed=4)[0]
    assert stats.kstest(outside, "norm", args=(0, SETUP.noise_multiplier)).pvalue > ALPHA
    assert ks_pvalue(outside, SETUP.noise_multiplier, SETUP.sample_rate) < ALPHA


def test_literal_steps_match_the_mixture_and_the_folded_trials(folded):
    """Trials as separate DP steps on a 4-example dataset (batches of 0-4 examples, some empty)
    have the same law as the folded trials: folding many trials into one step is faithful."""
    literal = release_one_step_at_a_time(SETUP, 2000, with_canary=True, seed=5)
    sigma, q = SETUP.noise_multiplier, SETUP.sample_rate
    assert ks_pvalue(literal, sigma, q) > ALPHA
    assert stats.ks_2samp(literal, folded).pvalue > ALPHA
    assert ks_pvalue(literal, sigma, 1.0) < ALPHA  # negative control: no subsampling
