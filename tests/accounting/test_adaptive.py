"""Effective noise multiplier of the gradient released jointly with K noisy counts."""

import math

import dp_accounting
import pytest
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from hypothesis import given
from hypothesis import strategies as st

from lightning_dp.accounting import (
    count_noise_multiplier_for,
    effective_noise_multiplier,
    gradient_noise_multiplier_for,
)


def _joint_release(sigma, sigma_b, k):
    """The gradient (sensitivity 1) and K centred counts (sensitivity 1/2 each), one event."""
    return dp_accounting.ComposedDpEvent([
        dp_accounting.GaussianDpEvent(sigma),
        dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(2 * sigma_b), k),
    ])


def test_formula():
    assert effective_noise_multiplier(1.0, 1.0, 4) == pytest.approx(1 / math.sqrt(2))
    assert effective_noise_multiplier(1.3, 5.0, 0) == 1.3
    assert effective_noise_multiplier(0.0, 5.0, 3) == 0.0
    assert effective_noise_multiplier(1.0, 0.0, 3) == 0.0


@given(sigma=st.floats(0.3, 20), sigma_b=st.floats(0.5, 200), k=st.integers(0, 50))
def test_inverse_round_trip(sigma, sigma_b, k):
    sigma_eff = effective_noise_multiplier(sigma, sigma_b, k)
    assert gradient_noise_multiplier_for(sigma_eff, sigma_b, k) == pytest.approx(sigma, rel=1e-9)


def test_inverse_refuses_counts_that_use_up_the_budget():
    # 4 counts at sigma_b = 1 alone have effective sigma 2 * 1 / sqrt(4) = 1.
    with pytest.raises(ValueError, match=r"`count_noise_multiplier`=1\.0.*above 1"):
        gradient_noise_multiplier_for(1.0, 1.0, 4)
    assert gradient_noise_multiplier_for(1.0, 1.01, 4) > 5


def test_non_subsampled_composition_equals_one_gaussian_at_sigma_eff():
    # Without subsampling, composing Gaussians is exactly one Gaussian at sigma_eff.
    sigma, sigma_b, k = 2.0, 3.0, 6
    composed = PLDAccountant().compose(_joint_release(sigma, sigma_b, k)).get_epsilon(1e-5)
    single = PLDAccountant().compose(
        dp_accounting.GaussianDpEvent(effective_noise_multiplier(sigma, sigma_b, k)))
    assert composed == pytest.approx(single.get_epsilon(1e-5), rel=1e-3)


def test_subsampled_joint_release_is_one_subsampled_gaussian_at_sigma_eff():
    # Gradient and counts come from the same Poisson batch: dp_accounting's RDP accountant
    # treats a PoissonSampledDpEvent of the composed release as one subsampled Gaussian.
    sigma, sigma_b, k, q, steps = 1.0, 5.0, 10, 0.01, 1000
    joint = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, _joint_release(sigma, sigma_b, k)), steps)
    sigma_eff = effective_noise_multiplier(sigma, sigma_b, k)
    single = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma_eff)), steps)
    assert RdpAccountant().compose(joint).get_epsilon(1e-5) == pytest.approx(
        RdpAccountant().compose(single).get_epsilon(1e-5), rel=1e-9)


@given(sigma_eff=st.floats(0.3, 20), k=st.integers(1, 200), share=st.floats(0.01, 0.9))
def test_default_count_noise_spends_exactly_its_share_of_the_budget(sigma_eff, k, share):
    sigma_b = count_noise_multiplier_for(sigma_eff, k, share)
    assert k * (2 * sigma_b) ** -2 == pytest.approx(share * sigma_eff**-2, rel=1e-12)
    sigma = gradient_noise_multiplier_for(sigma_eff, sigma_b, k)
    assert sigma == pytest.approx(sigma_eff / math.sqrt(1 - share), rel=1e-9)
    assert effective_noise_multiplier(sigma, sigma_b, k) == pytest.approx(sigma_eff, rel=1e-12)


@pytest.mark.parametrize(("args", "match"), [
    ((1.0, 0), r"`num_groups`=0"),
    ((1.0, 3, 1.0), r"`budget_share`=1\.0.*\(0, 1\)"),
    ((-1.0, 3), r"`effective_noise_multiplier`=-1\.0"),
])
def test_default_count_noise_refuses_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        count_noise_multiplier_for(*args)
