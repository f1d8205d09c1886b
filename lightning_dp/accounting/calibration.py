"""Calibrate the noise multiplier to a target (epsilon, delta) by bisection.

The search treats the accountant as a black box that is decreasing in sigma. It keeps a
bracket [lo, hi] with epsilon(lo) > target >= epsilon(hi) and narrows it geometrically until
lo >= hi * (1 - tolerance), then returns hi. So the returned sigma always meets the target,
and sigma * (1 - tolerance) (<= lo) does not: the answer is the smallest admissible sigma up
to a relative ``tolerance``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from lightning_dp.accounting._validation import (
    check_delta,
    check_sample_rate,
    check_steps,
    fail,
)
from lightning_dp.accounting.analysis import (
    DEFAULT_VALUE_DISCRETIZATION_INTERVAL,
    Accountant,
    check_accountant,
    epsilon_of_runs,
)

__all__ = ["noise_multiplier_for"]

# The RDP pre-search is cheap; its answer is only a starting guess for a PLD search.
_RDP_GUESS_TOLERANCE = 1e-2


def _bisect(meets: Callable[[float], bool], guess: float, factor: float, low: float,
            high: float, tolerance: float) -> float | None:
    """Smallest sigma in [low, high] with meets(sigma), to a relative tolerance; None if none.

    Starts at ``guess`` and steps by ``factor`` until the answer is bracketed, then bisects in
    log space. Returns ``low`` if even ``low`` meets the target.
    """
    guess = min(max(guess, low), high)
    if meets(guess):
        hi, lo = guess, guess / factor
        while lo > low and meets(lo):
            hi, lo = lo, lo / factor
        if lo <= low:
            if meets(low):
                return low
            lo = low
    else:
        lo, hi = guess, guess * factor
        while hi < high and not meets(hi):
            lo, hi = hi, hi * factor
        if hi >= high:
            if not meets(high):
                return None
            hi = high
    while lo < hi * (1 - tolerance):
        mid = math.sqrt(lo * hi)
        if meets(mid):
            hi = mid
        else:
            lo = mid
    return hi


def noise_multiplier_for(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: Accountant = "pld",
    num_samples: int | None = None,
    tolerance: float = 1e-3,
    noise_multiplier_range: tuple[float, float] = (0.1, 1e4),
    value_discretization_interval: float = DEFAULT_VALUE_DISCRETIZATION_INTERVAL,
) -> float:
    """Smallest noise multiplier whose DP-SGD run meets (target_epsilon, delta).

    The run is ``steps`` releases of the Poisson-subsampled Gaussian with rate
    ``sample_rate``; neighbouring datasets differ by adding or removing one example.
    ``epsilon(noise_multiplier=result, ...)`` with the same arguments is <= target_epsilon,
    and ``result * (1 - tolerance)`` exceeds it (unless the result is the range's lower end).

    For ``accountant="pld"`` a fast RDP search supplies the starting guess, so only a dozen
    or so PLD evaluations are needed. Targets that need sigma < 0.5 make PLD slow (seconds per
    evaluation); use ``accountant="rdp"`` there if time matters.

    Args:
        target_epsilon: Privacy budget, a finite float > 0.
        delta: Target delta in (0, 1).
        sample_rate: Poisson sampling probability q in (0, 1].
        steps: Planned number of optimizer steps, >= 1.
        accountant: ``"pld"`` (tight) or ``"rdp"`` (fast).
        num_samples: Dataset size N, if known: warns when delta >= 1/N.
        tolerance: Relative precision of the answer, in (0, 0.5).
        noise_multiplier_range: (low, high) sigmas searched. If ``low`` already meets the
            target it is returned (more noise than needed, never less).
        value_discretization_interval: PLD grid step.

    Raises:
        ValueError: On invalid arguments, or when even ``high`` noise misses the target.
    """
    if (isinstance(target_epsilon, bool) or not isinstance(target_epsilon, (int, float))
            or not 0 < target_epsilon < math.inf):
        fail("target_epsilon", target_epsilon, "a privacy budget must be a finite float > 0",
             "Pass e.g. target_epsilon=3.0.")
    delta = check_delta(delta, num_samples)
    q = check_sample_rate(sample_rate)
    steps = check_steps(steps, minimum=1)
    check_accountant(accountant, value_discretization_interval)
    if not (isinstance(tolerance, float) and 0 < tolerance < 0.5):
        fail("tolerance", tolerance, "the relative precision must be a float in (0, 0.5)",
             "Pass e.g. tolerance=1e-3.")
    low, high = noise_multiplier_range
    if not 0 < low < high < math.inf:
        fail("noise_multiplier_range", noise_multiplier_range,
             "it must be (low, high) with 0 < low < high < inf", "Pass e.g. (0.1, 1e4).")

    def meets(method: Accountant, sigma: float) -> bool:
        eps = epsilon_of_runs([(sigma, q, steps)], delta, accountant=method,
                              value_discretization_interval=value_discretization_interval)
        return eps <= target_epsilon

    guess = 1.0
    if accountant == "pld":
        rdp_sigma = _bisect(lambda s: meets("rdp", s), 1.0, 2.0, low, high, _RDP_GUESS_TOLERANCE)
        # PLD is at least as tight as RDP, so the RDP answer is a near-feasible start.
        guess = high if rdp_sigma is None else rdp_sigma
    sigma = _bisect(lambda s: meets(accountant, s), guess, 1.25 if accountant == "pld" else 2.0,
                    low, high, tolerance)
    if sigma is None:
        fail("target_epsilon", target_epsilon,
             f"no noise multiplier in the searched range [{low:g}, {high:g}] reaches it with "
             f"delta={delta!r}, sample_rate={q!r}, steps={steps} ({accountant} accountant)",
             "Raise target_epsilon, lower sample_rate or steps, or widen "
             "noise_multiplier_range.")
    return sigma
