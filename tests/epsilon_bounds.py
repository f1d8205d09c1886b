"""Clopper-Pearson lower bounds on epsilon from a membership test's error rates.

If a mechanism is (epsilon, delta)-DP, every test telling "canary in" from "canary out" has
false-positive rate FPR and false-negative rate FNR with FPR + e^eps FNR >= 1 - delta and
FNR + e^eps FPR >= 1 - delta (Kairouz et al. 2015). Upper confidence bounds on both rates turn
this into a lower confidence bound on epsilon (Jagielski et al. 2020; Nasr et al. 2021): if the
bound exceeds the accountant's epsilon, the implementation leaks more than it claims.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats


def clopper_pearson_upper(errors: int, trials: int, alpha: float) -> float:
    """One-sided (1 - alpha) upper confidence bound on a binomial rate."""
    if errors >= trials:
        return 1.0
    return float(stats.beta.ppf(1 - alpha, errors + 1, trials - errors))


def _bound_from_counts(
    false_pos: float, n_out: int, false_neg: float, n_in: int, delta: float, alpha: float
) -> float:
    fpr = clopper_pearson_upper(round(false_pos), n_out, alpha / 2)
    fnr = clopper_pearson_upper(round(false_neg), n_in, alpha / 2)
    bounds = [math.log((1 - delta - a) / b) for a, b in ((fpr, fnr), (fnr, fpr)) if 1 - delta - a > 0]
    return max([0.0, *bounds])


def epsilon_lower_bound(
    without: np.ndarray, with_canary: np.ndarray, threshold: float, *, delta: float, alpha: float
) -> float:
    """Lower (1 - alpha) confidence bound on epsilon of the test "canary in iff x > threshold".

    Both rates get one-sided bounds at alpha / 2 each, so they hold jointly with probability
    at least 1 - alpha (union bound); both DP inequalities are then valid at once.
    """
    return _bound_from_counts((without > threshold).sum(), len(without),
                              (with_canary <= threshold).sum(), len(with_canary), delta, alpha)


def audit_epsilon(
    without: np.ndarray,
    with_canary: np.ndarray,
    *,
    delta: float,
    confidence: float = 0.95,
    calibration_fraction: float = 0.25,
) -> float:
    """Lower confidence bound on epsilon, with the threshold chosen on held-out trials.

    The threshold is picked on the first ``calibration_fraction`` of each sample and the bound
    computed on the rest, so choosing it does not spend the confidence level. Candidates are
    quantiles of the calibration trials, each scored by the bound its calibration error rates
    would give at the size of the evaluation sample.
    """
    cut_out, cut_in = (int(len(x) * calibration_fraction) for x in (without, with_canary))
    cal_out, cal_in = without[:cut_out], with_canary[:cut_in]
    eval_out, eval_in = without[cut_out:], with_canary[cut_in:]
    alpha = 1 - confidence

    def predicted(threshold: float) -> float:
        fpr, fnr = (cal_out > threshold).mean(), (cal_in <= threshold).mean()
        return _bound_from_counts(fpr * len(eval_out), len(eval_out), fnr * len(eval_in),
                                  len(eval_in), delta, alpha)

    candidates = np.quantile(np.concatenate([cal_out, cal_in]), np.linspace(1e-4, 1 - 1e-4, 400))
    threshold = max(candidates, key=predicted)
    return epsilon_lower_bound(eval_out, eval_in, threshold, delta=delta, alpha=alpha)
