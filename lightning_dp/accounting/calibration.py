"""Calibrate the noise multiplier to a target (epsilon, delta) by a bracketing search.

The search treats the accountant as a black box that is decreasing in sigma. Like bisection
it keeps a bracket [lo, hi] with epsilon(lo) > target >= epsilon(hi), but it narrows it with
safeguarded secant steps in log-log space (fewer accountant calls), until
lo >= hi * (1 - tolerance), then returns hi. So the returned sigma always meets the target
and sigma * (1 - tolerance) (<= lo) does not: the answer is the smallest admissible sigma up
to a relative ``tolerance``.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator

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


def _next_probe(lo: float, eps_lo: float, hi: float, eps_hi: float, target: float) -> float:
    """Log-log secant estimate of the sigma with epsilon = target, kept inside the bracket.

    Clamping to the inner 80% of the (log) bracket guarantees it shrinks by at least 10% per
    probe, so the search always terminates; the secant makes it converge in a few probes.
    """
    t = 0.5
    if eps_hi > 0 and math.isfinite(eps_lo):
        t = math.log(eps_lo / target) / math.log(eps_lo / eps_hi)
    return lo * (hi / lo) ** min(max(t, 0.1), 0.9)


def _search(eps_of: Callable[[float], float], target: float, guess: float, factor: float,
            low: float, high: float, tolerance: float) -> float | None:
    """Smallest sigma in [low, high] with eps_of(sigma) <= target, to a relative tolerance.

    Steps from ``guess`` by ``factor`` until the answer is bracketed, then narrows the bracket
    [lo, hi] (eps_of(lo) > target >= eps_of(hi)) until lo >= hi * (1 - tolerance). Returns
    ``low`` if even ``low`` meets the target, None if ``high`` does not.
    """
    guess = min(max(guess, low), high)
    eps_guess = eps_of(guess)
    if eps_guess <= target:
        hi, eps_hi = guess, eps_guess
        while True:
            lo = max(hi / factor, low)
            eps_lo = eps_of(lo)
            if eps_lo > target:
                break
            if lo == low:
                return low
            hi, eps_hi = lo, eps_lo
    else:
        lo, eps_lo = guess, eps_guess
        while True:
            hi = min(lo * factor, high)
            eps_hi = eps_of(hi)
            if eps_hi <= target:
                break
            if hi == high:
                return None
            lo, eps_lo = hi, eps_hi
    while lo < hi * (1 - tolerance):
        probe = _next_probe(lo, eps_lo, hi, eps_hi, target)
        eps_probe = eps_of(probe)
        if eps_probe <= target:
            hi, eps_hi = probe, eps_probe
        else:
            lo, eps_lo = probe, eps_probe
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

    For ``accountant="pld"`` a fast RDP search supplies the starting guess, so about six PLD
    evaluations are needed: 1-10 s in typical DP-SGD settings at the default interval 1e-4,
    once per run. Targets that need sigma < 0.5 make each evaluation take seconds; use
    ``value_discretization_interval=1e-3`` or ``accountant="rdp"`` if time matters.

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

    def eps_of(method: Accountant) -> Callable[[float], float]:
        return lambda sigma: epsilon_of_runs(
            [(sigma, q, steps)], delta, accountant=method,
            value_discretization_interval=value_discretization_interval)

    guess = 1.0
    if accountant == "pld":
        with _quiet_rdp_orders():
            rdp_sigma = _search(eps_of("rdp"), target_epsilon, 1.0, 2.0, low, high,
                                _RDP_GUESS_TOLERANCE)
        # PLD is about as tight as RDP or tighter, so the RDP answer is a near-feasible start.
        guess = high if rdp_sigma is None else rdp_sigma
    sigma = _search(eps_of(accountant), target_epsilon, guess,
                    1.1 if accountant == "pld" else 2.0, low, high, tolerance)
    if sigma is None:
        fail("target_epsilon", target_epsilon,
             f"no noise multiplier in the searched range [{low:g}, {high:g}] reaches it with "
             f"delta={delta!r}, sample_rate={q!r}, steps={steps} ({accountant} accountant)",
             "Raise target_epsilon, lower sample_rate or steps, or widen "
             "noise_multiplier_range.")
    return sigma


class _DropUnconvergedOrders(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("_compute_log_a_frac failed to converge")


@contextlib.contextmanager
def _quiet_rdp_orders() -> Iterator[None]:
    """Drop dp_accounting's warning that an RDP order did not converge, while RDP only supplies
    the PLD search's starting guess: that order is left out of the minimum over orders, which
    can only loosen the guess, and the answer is the PLD accountant's."""
    logger, quiet = logging.getLogger("absl"), _DropUnconvergedOrders()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)
