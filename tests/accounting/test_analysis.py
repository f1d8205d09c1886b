"""epsilon(): golden figures, invariants and argument checks."""

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import RdpAccountant

from lightning_dp.accounting import LargeDeltaWarning, epsilon


def _dp_sgd_event(sigma, q, steps):
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)


# TF-Privacy's compute_dp_sgd_privacy_lib_test (tensorflow/privacy, RDP accountant):
# (n, batch size, sigma, epochs, delta) -> epsilon, with q = batch/n and steps = epochs*n/batch.
@pytest.mark.parametrize(
    ("n", "batch", "sigma", "epochs", "delta", "expected"),
    [
        (60000, 150, 1.3, 15, 1e-5, 0.7242234026109595),
        (100000, 100, 1.0, 30, 1e-7, 1.4154988495444845),
    ],
)
def test_rdp_matches_tf_privacy_published_values(n, batch, sigma, epochs, delta, expected):
    eps = epsilon(noise_multiplier=sigma, sample_rate=batch / n, steps=epochs * n // batch,
                  delta=delta, accountant="rdp")
    assert eps == pytest.approx(expected, abs=1e-6)


def test_abadi_moments_accountant_figure():
    # Abadi et al. 2016, Sec. 3.1: q=0.01, sigma=4, delta=1e-5, T=10,000 steps gives
    # epsilon ~ 1.26 with the moments accountant (integer orders, the classical conversion
    # eps = min_a rdp(a) + log(1/delta)/(a-1)). The same RDP curve from dp_accounting
    # reproduces that figure ...
    orders = np.arange(2, 65)
    curve = RdpAccountant(orders=orders).compose(_dp_sgd_event(4.0, 0.01, 10_000)).rdp
    assert np.min(curve + math.log(1e5) / (orders - 1)) == pytest.approx(1.26, abs=0.005)
    # ... and our accountants, with the tighter modern conversions, certify less.
    rdp = epsilon(noise_multiplier=4.0, sample_rate=0.01, steps=10_000, delta=1e-5,
                  accountant="rdp")
    pld = epsilon(noise_multiplier=4.0, sample_rate=0.01, steps=10_000, delta=1e-5)
    assert rdp == pytest.approx(1.0355, abs=1e-3)  # dp_accounting 0.6 RDP (regression pin)
    assert pld == pytest.approx(0.947, abs=2e-3)  # dp_accounting 0.6 PLD, interval 1e-4
    assert pld < rdp < 1.26


def test_same_as_dp_accounting_directly():
    event = _dp_sgd_event(2.0, 256 / 60000, 3000)
    expected = dp_accounting.pld.PLDAccountant().compose(event).get_epsilon(1e-5)
    assert epsilon(noise_multiplier=2.0, sample_rate=256 / 60000, steps=3000,
                   delta=1e-5) == expected


@pytest.mark.parametrize("sigma", [1.5, 4.0])
@pytest.mark.parametrize(("q", "steps"), [(0.001, 2000), (0.01, 500), (0.1, 50)])
def test_pld_never_looser_than_rdp(sigma, q, steps):
    kw = {"noise_multiplier": sigma, "sample_rate": q, "steps": steps, "delta": 1e-5}
    assert epsilon(**kw, accountant="pld") <= epsilon(**kw, accountant="rdp") * 1.001


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_monotone_in_steps_rate_and_noise(accountant):
    def eps(sigma=3.0, q=0.02, steps=200):
        return epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=1e-5,
                       accountant=accountant)

    assert eps(steps=50) < eps(steps=200) < eps(steps=800)
    assert eps(q=0.005) < eps(q=0.02) < eps(q=0.08)
    assert eps(sigma=6.0) < eps(sigma=3.0) < eps(sigma=2.0)


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_edge_cases(accountant):
    kw = {"delta": 1e-5, "accountant": accountant}
    assert epsilon(noise_multiplier=1.0, sample_rate=0.0, steps=100, **kw) == 0.0
    assert epsilon(noise_multiplier=0.0, sample_rate=0.0, steps=100, **kw) == 0.0
    assert epsilon(noise_multiplier=1.0, sample_rate=0.1, steps=0, **kw) == 0.0
    assert epsilon(noise_multiplier=0.0, sample_rate=0.1, steps=1, **kw) == math.inf
    assert 0.0 <= epsilon(noise_multiplier=1e3, sample_rate=0.01, steps=10, **kw) < 0.01
    assert epsilon(noise_multiplier=2.0, sample_rate=1.0, steps=10, **kw) > 0


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"sample_rate": -0.1}, "sample_rate"),
        ({"sample_rate": 1.5}, "sample_rate"),
        ({"sample_rate": math.nan}, "sample_rate"),
        ({"delta": 0.0}, "delta"),
        ({"delta": 1.0}, "delta"),
        ({"delta": math.inf}, "delta"),
        ({"steps": -1}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"noise_multiplier": -1.0}, "noise_multiplier"),
        ({"noise_multiplier": math.inf}, "noise_multiplier"),
        ({"accountant": "moments"}, "accountant"),
        ({"value_discretization_interval": 0.0}, "value_discretization_interval"),
        ({"num_samples": 0}, "num_samples"),
    ],
)
def test_bad_arguments_name_the_parameter_and_value(kwargs, name):
    args = {"noise_multiplier": 1.0, "sample_rate": 0.01, "steps": 10, "delta": 1e-5} | kwargs
    with pytest.raises(ValueError, match=f"`{name}`={kwargs[name]!r}"):
        epsilon(**args)


def test_large_delta_warns_only_when_delta_reaches_one_over_n(recwarn):
    kw = {"noise_multiplier": 1.0, "sample_rate": 0.01, "steps": 10, "accountant": "rdp"}
    with pytest.warns(LargeDeltaWarning, match="1/num_samples"):
        epsilon(**kw, delta=1e-3, num_samples=1000)
    epsilon(**kw, delta=1e-4, num_samples=1000)
    epsilon(**kw, delta=1e-3)
    assert not [w for w in recwarn if issubclass(w.category, LargeDeltaWarning)]


def test_cached_pld_composition_equals_dp_accountings_pld_accountant():
    """The cached single-release PLD, self-composed, gives dp_accounting's exact figure."""
    from dp_accounting.pld import PLDAccountant

    from lightning_dp.accounting.analysis import composed_event, epsilon_of_runs

    runs = [(1.1, 0.01, 500), (0.9, 0.02, 200), (1.1, 0.01, 300)]
    reference = PLDAccountant(value_discretization_interval=1e-4)
    want = reference.compose(composed_event(runs)).get_epsilon(1e-5)
    assert epsilon_of_runs(runs, 1e-5, accountant="pld") == pytest.approx(want, rel=1e-12)
