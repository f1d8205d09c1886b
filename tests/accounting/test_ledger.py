"""PrivacyLedger: heterogeneous steps, extra releases, joint counts, state round-trip."""

import io

import dp_accounting
import pytest
import torch
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

import lightning_dp.accounting.ledger as ledger_module
from lightning_dp.accounting import (
    LargeDeltaWarning,
    LedgerEntry,
    PrivacyLedger,
    effective_noise_multiplier,
    epsilon,
)

DELTA = 1e-5


def _sampled(sigma, q):
    return dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))


def _heterogeneous_ledger(accountant):
    ledger = PrivacyLedger(accountant=accountant)
    for _ in range(5):
        ledger.step(noise_multiplier=3.0, sample_rate=0.02)
    ledger.step(noise_multiplier=2.5, sample_rate=0.05, num_steps=4)
    ledger.step(noise_multiplier=3.0, sample_rate=0.02, num_steps=3)
    return ledger


def test_history_is_run_length_encoded():
    ledger = _heterogeneous_ledger("rdp")
    assert ledger.history == (
        LedgerEntry("step", 3.0, 0.02, 5),
        LedgerEntry("step", 2.5, 0.05, 4),
        LedgerEntry("step", 3.0, 0.02, 3),
    )
    assert ledger.steps == 12


def test_rdp_heterogeneous_steps_equal_step_by_step_dp_accounting():
    reference = RdpAccountant()
    for sigma, q, n in [(3.0, 0.02, 5), (2.5, 0.05, 4), (3.0, 0.02, 3)]:
        for _ in range(n):
            reference.compose(_sampled(sigma, q))
    assert _heterogeneous_ledger("rdp").epsilon(DELTA) == pytest.approx(
        reference.get_epsilon(DELTA), rel=1e-9)


def test_pld_heterogeneous_steps_equal_dp_accounting():
    reference = PLDAccountant()
    for sigma, q, n in [(3.0, 0.02, 5), (2.5, 0.05, 4), (3.0, 0.02, 3)]:
        reference.compose(_sampled(sigma, q), n)
    ledger = _heterogeneous_ledger("pld")
    assert ledger.epsilon(DELTA) == pytest.approx(reference.get_epsilon(DELTA), rel=1e-6)
    assert ledger.epsilon(DELTA) == pytest.approx(
        PLDAccountant().compose(ledger.dp_event).get_epsilon(DELTA), rel=1e-12)


def test_homogeneous_ledger_equals_epsilon_function():
    ledger = PrivacyLedger()
    ledger.step(noise_multiplier=2.0, sample_rate=0.02, num_steps=40)
    assert ledger.epsilon(DELTA) == epsilon(noise_multiplier=2.0, sample_rate=0.02, steps=40,
                                            delta=DELTA)


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_state_dict_round_trip_through_torch_save(accountant):
    ledger = _heterogeneous_ledger(accountant)
    ledger.compose_gaussian(10.0, count=2)
    buffer = io.BytesIO()
    torch.save(ledger.state_dict(), buffer)
    buffer.seek(0)
    restored = PrivacyLedger(accountant=accountant)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.history == ledger.history
    assert restored.epsilon(DELTA) == ledger.epsilon(DELTA)
    restored.step(noise_multiplier=3.0, sample_rate=0.02)
    assert restored.epsilon(DELTA) > ledger.epsilon(DELTA)


def test_extra_gaussian_releases_compose_in():
    ledger = PrivacyLedger(accountant="rdp")
    ledger.step(noise_multiplier=2.0, sample_rate=0.02, num_steps=50)
    before = ledger.epsilon(DELTA)
    ledger.compose_gaussian(8.0, sample_rate=0.02, count=50)
    ledger.compose_gaussian(20.0)
    reference = RdpAccountant().compose(dp_accounting.ComposedDpEvent([
        dp_accounting.SelfComposedDpEvent(_sampled(2.0, 0.02), 50),
        dp_accounting.SelfComposedDpEvent(_sampled(8.0, 0.02), 50),
        dp_accounting.GaussianDpEvent(20.0),
    ]))
    assert ledger.epsilon(DELTA) == pytest.approx(reference.get_epsilon(DELTA), rel=1e-9)
    assert ledger.epsilon(DELTA) > before
    assert ledger.steps == 50


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_counts_on_the_same_batch_are_charged_as_one_gaussian_at_sigma_eff(accountant):
    sigma, sigma_b, k, q, n = 2.0, 4.0, 8, 0.02, 100
    ledger = PrivacyLedger(accountant=accountant)
    ledger.step(noise_multiplier=sigma, sample_rate=q, num_steps=n,
                count_noise_multiplier=sigma_b, num_groups=k)
    sigma_eff = effective_noise_multiplier(sigma, sigma_b, k)
    assert ledger.history == (LedgerEntry("step", sigma_eff, q, n),)
    assert ledger.epsilon(DELTA) == epsilon(noise_multiplier=sigma_eff, sample_rate=q,
                                            steps=n, delta=DELTA, accountant=accountant)
    # Charging the counts as a separately subsampled release would under-count.
    separate = PrivacyLedger(accountant=accountant)
    separate.step(noise_multiplier=sigma, sample_rate=q, num_steps=n)
    separate.compose_gaussian(2 * sigma_b / k**0.5, sample_rate=q, count=n)
    assert ledger.epsilon(DELTA) > separate.epsilon(DELTA)


def test_joint_charge_matches_dp_accounting_joint_event():
    sigma, sigma_b, k, q, n = 1.5, 4.0, 8, 0.02, 200
    ledger = PrivacyLedger(accountant="rdp")
    ledger.step(noise_multiplier=sigma, sample_rate=q, num_steps=n,
                count_noise_multiplier=sigma_b, num_groups=k)
    joint = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.ComposedDpEvent([
        dp_accounting.GaussianDpEvent(sigma),
        dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(2 * sigma_b), k),
    ]))
    reference = RdpAccountant().compose(dp_accounting.SelfComposedDpEvent(joint, n))
    assert ledger.epsilon(DELTA) == pytest.approx(reference.get_epsilon(DELTA), rel=1e-9)


def test_epsilon_is_cached_until_the_next_release(monkeypatch):
    calls = []
    original = ledger_module.epsilon_of_runs
    monkeypatch.setattr(ledger_module, "epsilon_of_runs",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    ledger = PrivacyLedger(accountant="rdp")
    ledger.step(noise_multiplier=2.0, sample_rate=0.02)
    first = ledger.epsilon(DELTA)
    assert ledger.epsilon(DELTA) == first and len(calls) == 1
    ledger.step(noise_multiplier=2.0, sample_rate=0.02)
    assert ledger.epsilon(DELTA) > first and len(calls) == 2


def test_edge_cases():
    ledger = PrivacyLedger()
    assert ledger.epsilon(DELTA) == 0.0
    ledger.step(noise_multiplier=2.0, sample_rate=0.1, num_steps=0)
    assert ledger.history == ()
    ledger.step(noise_multiplier=0.0, sample_rate=0.1)
    assert ledger.epsilon(DELTA) == float("inf")


def test_large_delta_warning():
    ledger = PrivacyLedger(accountant="rdp", num_samples=100)
    ledger.step(noise_multiplier=2.0, sample_rate=0.1)
    with pytest.warns(LargeDeltaWarning):
        ledger.epsilon(0.01)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda l: l.step(noise_multiplier=1.0, sample_rate=0.0), "`sample_rate`=0.0"),
        (lambda l: l.step(noise_multiplier=1.0, sample_rate=0.1, num_steps=-1),
         "`num_steps`=-1"),
        (lambda l: l.step(noise_multiplier=1.0, sample_rate=0.1, num_groups=3),
         "`count_noise_multiplier`=None"),
        (lambda l: l.compose_gaussian(-2.0), "`noise_multiplier`=-2.0"),
        (lambda l: l.epsilon(0.0), "`delta`=0.0"),
        (lambda l: l.load_state_dict({}), "`state_dict`"),
        (lambda l: l.load_state_dict({"history": [["sgd", 1.0, 0.1, 3]]}), "`state_dict`"),
    ],
)
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call(PrivacyLedger())


def test_bad_accountant():
    with pytest.raises(ValueError, match="`accountant`='prv'"):
        PrivacyLedger(accountant="prv")


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_epsilon_after_more_steps_composes_them_after_the_history(accountant):
    ledger = PrivacyLedger(accountant=accountant)
    ledger.step(noise_multiplier=1.0, sample_rate=0.5, num_steps=4)
    after = ledger.epsilon_after(DELTA, noise_multiplier=1.0, sample_rate=0.05, steps=30)
    charged = PrivacyLedger(accountant=accountant)
    charged.load_state_dict(ledger.state_dict())
    charged.step(noise_multiplier=1.0, sample_rate=0.05, num_steps=30)
    assert after == pytest.approx(charged.epsilon(DELTA), rel=1e-9)
    assert ledger.steps == 4  # the history is unchanged
    # the same (sigma, q) as the history: one run, exactly epsilon() of all the steps
    same = ledger.epsilon_after(DELTA, noise_multiplier=1.0, sample_rate=0.5, steps=6)
    assert same == epsilon(noise_multiplier=1.0, sample_rate=0.5, steps=10, delta=DELTA, accountant=accountant)
    # the steps spent at q = 0.5 cost more than the new rate would charge them
    assert after > epsilon(noise_multiplier=1.0, sample_rate=0.05, steps=34, delta=DELTA, accountant=accountant)
