"""Noise bookkeeping for adaptive clipping thresholds released alongside the gradient.

With K parameter groups, adaptive thresholds (Andrew et al. 2021) release per step one noisy
count per group, sum_i (1[||g_ik|| <= C_k] - 1/2) + N(0, sigma_b^2), computed on the SAME
Poisson batch as the gradient. Per example, the gradient part has sensitivity 1 in units of
the noise multiplier sigma and the K centred bits have L2 sensitivity sqrt(K)/2. Stacking
both releases gives ONE Gaussian mechanism whose noise multiplier, in units of the joint
sensitivity, is

    sigma_eff = (sigma^-2 + K * (2 * sigma_b)^-2) ^ (-1/2),

and that one mechanism is Poisson-subsampled once. The accountant must charge a single
subsampled Gaussian at sigma_eff per step. Composing the counts as a second, separately
subsampled mechanism would under-charge: subsampling twice independently amplifies more
than the shared batch really does.
"""

from __future__ import annotations

import math

from lightning_dp.accounting._validation import check_noise_multiplier, check_steps, fail

__all__ = [
    "DEFAULT_COUNT_BUDGET_SHARE",
    "count_noise_multiplier_for",
    "effective_noise_multiplier",
    "gradient_noise_multiplier_for",
]

#: Share of the joint mechanism's precision (sigma_eff^-2) spent on the counts by default: small
#: enough to raise the gradient sigma by only ~2.6%, enough to track a quantile per group.
DEFAULT_COUNT_BUDGET_SHARE = 0.05


def _precision(sigma: float) -> float:
    return math.inf if sigma == 0 else sigma**-2


def effective_noise_multiplier(
    noise_multiplier: float, count_noise_multiplier: float, num_groups: int
) -> float:
    """sigma_eff of the gradient released jointly with ``num_groups`` centred noisy counts.

    Args:
        noise_multiplier: Gradient noise std in units of its L2 sensitivity (sigma).
        count_noise_multiplier: Std of the Gaussian noise on each count (sigma_b).
        num_groups: Number of counts released per step (K); 0 means none.

    Returns:
        The noise multiplier to charge the accountant for each step (0.0 if any part is
        released without noise).
    """
    sigma = check_noise_multiplier(noise_multiplier)
    sigma_b = check_noise_multiplier(count_noise_multiplier, "count_noise_multiplier")
    k = check_steps(num_groups, "num_groups")
    total = _precision(sigma) + (k * _precision(2 * sigma_b) if k else 0.0)
    return 0.0 if total == math.inf else total**-0.5


def gradient_noise_multiplier_for(
    effective_noise_multiplier: float, count_noise_multiplier: float, num_groups: int
) -> float:
    """Gradient sigma that, with K counts at sigma_b, gives the target sigma_eff.

    This is how a run calibrated for sigma_eff (e.g. by ``noise_multiplier_for``) splits its
    budget between the gradient and the adaptive-threshold counts.

    Raises:
        ValueError: If the counts alone already cost the whole budget, i.e.
            ``count_noise_multiplier <= sigma_eff * sqrt(K) / 2``.
    """
    target = check_noise_multiplier(effective_noise_multiplier, "effective_noise_multiplier")
    sigma_b = check_noise_multiplier(count_noise_multiplier, "count_noise_multiplier")
    k = check_steps(num_groups, "num_groups")
    if target == 0:
        fail("effective_noise_multiplier", effective_noise_multiplier,
             "a zero target leaves nothing to split", "Pass a positive noise multiplier.")
    remaining = target**-2 - (k * _precision(2 * sigma_b) if k else 0.0)
    if remaining <= 0:
        minimum = target * math.sqrt(k) / 2
        fail("count_noise_multiplier", count_noise_multiplier,
             f"{k} noisy counts at this noise already use up the whole privacy budget of "
             f"effective_noise_multiplier={target!r}, leaving none for the gradient",
             f"Use count_noise_multiplier well above {minimum:.4g} (sigma_eff * sqrt(K) / 2); "
             "e.g. K * sigma_eff spends only 1/(4K) of the budget on the counts.")
    return remaining**-0.5


def count_noise_multiplier_for(
    effective_noise_multiplier: float,
    num_groups: int,
    budget_share: float = DEFAULT_COUNT_BUDGET_SHARE,
) -> float:
    """sigma_b at which K centred counts spend ``budget_share`` of a budget of sigma_eff.

    The counts' precision is K (2 sigma_b)^-2; setting it to ``budget_share * sigma_eff^-2``
    gives sigma_b = sigma_eff * sqrt(K / (4 * budget_share)). The gradient then gets
    ``gradient_noise_multiplier_for(...) = sigma_eff / sqrt(1 - budget_share)``. Scaling with
    sqrt(K) keeps the total cost fixed however many groups there are.
    """
    target = check_noise_multiplier(effective_noise_multiplier, "effective_noise_multiplier")
    k = check_steps(num_groups, "num_groups", minimum=1)
    if not 0 < budget_share < 1:
        fail("budget_share", budget_share, "it is the fraction of the privacy budget spent on "
             "the counts and must lie in (0, 1)", "Pass e.g. 0.05.")
    return target * math.sqrt(k / (4 * budget_share))
