"""Adaptive thresholds: the update rule, its noisy counts, and what it may read."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lightning_dp as ldp
from lightning_dp.engine import clipper_of
from lightning_dp.thresholds import (
    AdaptiveThresholds,
    check_adaptive_settings,
    noisy_counts,
    updated_thresholds,
)

ETA = 0.2


def _lognormal_population(n: int) -> torch.Tensor:
    """Norms whose log is at the standard normal's (i + 1/2)/n quantiles: F(C) ~ Phi(log C)."""
    levels = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return torch.distributions.Normal(0.0, 1.0).icdf(levels).exp()


def _centred(norms: torch.Tensor, threshold: float) -> float:
    return float(((norms <= threshold).double() - 0.5).sum())


@pytest.mark.parametrize("quantile", [0.3, 0.5, 0.9])
def test_without_noise_the_threshold_settles_at_the_empirical_quantile(quantile):
    """Whole-batch counts (q = 1, sigma_b = 0): the update is exactly 1 between the order
    statistics that bracket r N, and pushes toward them from anywhere else. Neighbouring norms
    are 4% apart, wider than the update's finest step exp(eta / N), so it cannot jump over."""
    norms = torch.linspace(-2, 2, 100, dtype=torch.float64).exp()[torch.randperm(100)]
    ordered = norms.sort().values
    k = round(quantile * len(norms))  # r N is an integer: a stationary interval exists
    low, high = float(ordered[k - 1]), float(ordered[k])
    for start in (1e-3, 100.0):
        threshold = {"g": start}
        for _ in range(3000):
            counts = {"g": _centred(norms, threshold["g"])}
            threshold = updated_thresholds(threshold, counts, expected_batch_size=len(norms),
                                           target_quantile=quantile, threshold_lr=ETA)
        assert low <= threshold["g"] < high, (start, threshold, low, high)
        # negative control: the interval of a quantile 0.05 away does not contain it
        other = round((quantile - 0.05) * len(norms))
        assert not float(ordered[other - 1]) <= threshold["g"] < float(ordered[other])


@pytest.mark.parametrize("quantile", [0.5, 0.8])
def test_with_count_noise_the_threshold_converges_in_expectation(quantile):
    """Many independent chains on Poisson batches with noisy counts: at stationarity
    E[log C] stops moving, so E[F(C_T)] = r exactly, F the population's fraction within C.

    Tolerance from the noise: linearising F(C) ~ r + f (log C - log c*), with f = phi(z_r) for
    this population, log C is AR(1) with stationary variance eta s^2 / (2 f) where s^2 is the
    per-step variance of the fraction estimate, (sigma_b^2 + N q (1-q) / 4) / (qN)^2; so
    sd(F(C_T)) ~ sqrt(eta f s^2 / 2), and the mean over K chains is within 4 sd / sqrt(K).
    """
    population = _lognormal_population(200)
    q, sigma_b, chains, steps = 0.1, 2.0, 300, 200
    expected = q * len(population)
    generator = torch.Generator().manual_seed(1)
    thresholds = {f"chain{c}": 10.0 for c in range(chains)}  # far above every quantile
    for _ in range(steps):
        current = torch.tensor(list(thresholds.values()), dtype=torch.float64)
        in_batch = torch.rand(chains, len(population), generator=generator) < q
        within = population[None, :] <= current[:, None]
        centred = (in_batch * (within.double() - 0.5)).sum(1)
        released = noisy_counts(centred, count_noise_multiplier=sigma_b, generator=generator)
        thresholds = updated_thresholds(
            thresholds, dict(zip(thresholds, released.tolist())), expected_batch_size=expected,
            target_quantile=quantile, threshold_lr=ETA)
    final = torch.tensor(list(thresholds.values()), dtype=torch.float64)
    fraction_within = (population[None, :] <= final[:, None]).double().mean(1)

    normal = torch.distributions.Normal(0.0, 1.0)
    slope = normal.log_prob(normal.icdf(torch.tensor(quantile))).exp().item()
    step_var = (sigma_b**2 + len(population) * q * (1 - q) / 4) / expected**2
    tolerance = 4 * math.sqrt(ETA * slope * step_var / 2 / chains)
    mean = fraction_within.mean().item()
    assert abs(mean - quantile) < tolerance, (mean, tolerance)
    assert abs(mean - (quantile + 0.05)) > tolerance  # negative control: the test has power
    # the derived spread is the right size (the chains agree with it to ~5%)
    assert 0.75 < fraction_within.std().item() / math.sqrt(ETA * slope * step_var / 2) < 1.33


def _private_linear(threshold: float = 1.0) -> nn.Module:
    model = nn.Linear(4, 1, bias=False)
    return ldp.make_private(model, clipping="flat", max_grad_norm=threshold, thresholds="adaptive")


def _batch_with_norms(norms: list[float]) -> torch.Tensor:
    """Inputs whose per-example gradient (of the summed output) has exactly these norms."""
    x = torch.zeros(len(norms), 4)
    x[:, 0] = torch.tensor(norms)
    return x


def _step_thresholds(norms: list[float], splits: int = 1, seed: int = 3) -> tuple[dict, dict]:
    model = _private_linear()
    adaptive = AdaptiveThresholds(threshold_lr=ETA)
    adaptive.attach(clipper_of(model))
    for part in _batch_with_norms(norms).chunk(splits):
        model(part).sum().backward()
    adaptive.release(count_noise_multiplier=2.0, expected_batch_size=4.0,
                     generator=torch.Generator().manual_seed(seed))
    return adaptive.thresholds, ldp.group_norms(model)


def test_thresholds_depend_on_the_norms_only_through_the_noisy_count():
    a, norms_a = _step_thresholds([0.5, 0.7, 2.0, 3.0])
    b, norms_b = _step_thresholds([0.1, 0.9, 1.5, 10.0])  # other norms, same count within C = 1
    assert not torch.equal(norms_a["flat"], norms_b["flat"])
    assert a == b
    # negative control: one example crosses C, the count moves by one, the update by exp(-eta/qN)
    crossed, _ = _step_thresholds([0.5, 0.7, 0.8, 3.0])
    assert crossed["flat"] == pytest.approx(a["flat"] * math.exp(-ETA / 4.0), rel=1e-12)


def test_counts_sum_over_the_backwards_of_one_logical_batch():
    norms = [0.5, 0.7, 2.0, 3.0, 0.2]
    whole, _ = _step_thresholds(norms)
    split, _ = _step_thresholds(norms, splits=3)
    assert split == whole
    # an empty micro-batch adds nothing
    model = _private_linear()
    model(torch.zeros(0, 4)).sum().backward()
    model(_batch_with_norms(norms)).sum().backward()
    counts = clipper_of(model).take_counts(torch.device("cpu"))
    assert counts.tolist() == [3 - 2.5]
    assert clipper_of(model).take_counts(torch.device("cpu")).tolist() == [0.0]  # reset


def test_noisy_counts_use_one_draw_per_group_from_the_given_stream():
    counts = torch.tensor([1.5, -2.0, 0.5])
    got = noisy_counts(counts, count_noise_multiplier=4.0, generator=torch.Generator().manual_seed(5))
    want = counts + 4.0 * torch.randn(3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(got, want)
    assert torch.equal(noisy_counts(counts, count_noise_multiplier=4.0, generator=None,
                                    add_noise=False), counts)


def test_under_data_parallelism_the_counts_are_noised_once_then_summed():
    """Two ranks with per-rank streams: rank 0 alone adds noise before the sum (what
    DPFSDPStrategy does with an all-reduce), so the total has exactly one draw per group."""
    local = [torch.tensor([0.5, 0.0]), torch.tensor([1.5, -1.0])]
    streams = [torch.Generator().manual_seed(100 + rank) for rank in range(2)]
    others = noisy_counts(local[1], count_noise_multiplier=2.0, generator=streams[1], add_noise=False)
    released = noisy_counts(local[0], count_noise_multiplier=2.0, generator=streams[0],
                            add_noise=True, sum_across_ranks=lambda t: t + others)
    noise = 2.0 * torch.randn(2, generator=torch.Generator().manual_seed(100))
    torch.testing.assert_close(released, torch.tensor([2.0, -1.0]) + noise)
    assert streams[1].get_state().equal(torch.Generator().manual_seed(101).get_state())


def test_restored_thresholds_reach_a_clipper_attached_later_and_refuse_other_groups():
    adaptive = AdaptiveThresholds()
    adaptive.attach(clipper_of(_private_linear(2.0)))
    saved = adaptive.state_dict()
    resumed = AdaptiveThresholds()
    resumed.load_state_dict(saved)
    model = _private_linear(1.0)
    resumed.attach(clipper_of(model))
    assert ldp.group_thresholds(model) == {"flat": 2.0}
    other = ldp.make_private(nn.Linear(4, 1), clipping="layer", thresholds="adaptive")
    stale = AdaptiveThresholds()
    stale.load_state_dict(saved)
    with pytest.raises(ValueError, match=r"groups \['flat'\].*groups are \['\(root\)'\]"):
        stale.attach(clipper_of(other))
    with pytest.raises(ValueError, match="thresholds='adaptive'"):
        AdaptiveThresholds().attach(clipper_of(ldp.make_private(nn.Linear(4, 1))))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(target_quantile=0.0), r"`target_quantile`=0\.0 .*\(0, 1\)"),
        (dict(target_quantile=1.0), r"`target_quantile`=1\.0"),
        (dict(target_quantile=float("nan")), r"`target_quantile`=nan"),
        (dict(threshold_lr=0.0), r"`threshold_lr`=0\.0 .*positive"),
        (dict(threshold_lr=-1.0), r"`threshold_lr`=-1\.0"),
        (dict(count_noise_multiplier=0.0), r"`count_noise_multiplier`=0\.0 .*positive"),
        (dict(count_noise_multiplier=-2.0), r"`count_noise_multiplier`=-2\.0"),
        (dict(count_noise_multiplier=True), r"`count_noise_multiplier`=True"),
    ],
)
def test_bad_settings_name_the_parameter_value_and_fix(kwargs, match):
    settings = dict(target_quantile=0.5, threshold_lr=0.2, count_noise_multiplier=None) | kwargs
    with pytest.raises(ValueError, match=match):
        check_adaptive_settings(**settings)


def test_before_attach_there_are_no_thresholds_and_nothing_to_release():
    adaptive = AdaptiveThresholds()
    assert adaptive.thresholds == {} and adaptive.history == {}
    with pytest.raises(RuntimeError, match="before attach"):
        adaptive.release(count_noise_multiplier=1.0, expected_batch_size=4.0, generator=None)
