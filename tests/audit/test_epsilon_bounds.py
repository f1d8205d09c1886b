"""The Clopper-Pearson epsilon bound on cases with a known answer."""

import math

import numpy as np
from epsilon_bounds import audit_epsilon, clopper_pearson_upper, epsilon_lower_bound


def test_clopper_pearson_upper_with_no_errors_is_exact():
    # P(0 errors | rate p) = (1 - p)^n = alpha  at the bound.
    assert math.isclose(clopper_pearson_upper(0, 1000, 0.05), 1 - 0.05 ** (1 / 1000), rel_tol=1e-9)
    assert clopper_pearson_upper(7, 7, 0.05) == 1.0


def test_clopper_pearson_upper_covers_the_true_rate():
    rng = np.random.default_rng(0)
    errors = rng.binomial(200, 0.1, size=2000)
    covered = np.mean([clopper_pearson_upper(int(k), 200, 0.05) >= 0.1 for k in errors])
    assert covered >= 0.95


def test_perfect_separation_is_limited_by_the_sample_size():
    n, delta, alpha = 10_000, 1e-5, 0.05
    bound = epsilon_lower_bound(np.zeros(n), np.ones(n), 0.5, delta=delta, alpha=alpha)
    worst_rate = 1 - (alpha / 2) ** (1 / n)
    assert math.isclose(bound, math.log((1 - delta - worst_rate) / worst_rate))


def test_gaussian_mechanism_bound_is_below_its_true_epsilon_and_a_leak_is_found():
    rng = np.random.default_rng(1)
    n, delta = 100_000, 1e-5
    sigma = 2.0  # the Gaussian mechanism with sigma 2 (sensitivity 1) is (1.99, 1e-5)-DP
    without, with_canary = rng.normal(0, sigma, n), rng.normal(1, sigma, n)
    assert 0.5 < audit_epsilon(without, with_canary, delta=delta) < 1.99
    # sigma 0.5 has epsilon ~9: far beyond what 10^5 trials can certify, but clearly above 2
    assert audit_epsilon(rng.normal(0, 0.5, n), rng.normal(1, 0.5, n), delta=delta) > 3


def test_identical_worlds_give_no_evidence():
    rng = np.random.default_rng(2)
    samples = rng.normal(size=(2, 50_000))
    assert audit_epsilon(*samples, delta=1e-5) < 0.1
