"""Input checks shared by the accounting functions.

Every check raises a ``ValueError`` that names the parameter, shows the value, says why it
is wrong and how to fix it. User input is never validated with ``assert``.
"""

from __future__ import annotations

import math
import numbers
import warnings

__all__ = [
    "LargeDeltaWarning",
    "check_delta",
    "check_noise_multiplier",
    "check_num_samples",
    "check_sample_rate",
    "check_steps",
    "fail",
]


class LargeDeltaWarning(UserWarning):
    """Delta is at least 1/N: a mechanism that publishes one random example outright meets it."""


def fail(name: str, value: object, why: str, fix: str) -> None:
    """Raise the library's standard ValueError for a bad argument."""
    raise ValueError(f"`{name}`={value!r} is invalid: {why}. {fix}")


def _check_real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        fail(name, value, "it must be a real number", f"Pass a float for `{name}`.")
    if not math.isfinite(value):
        fail(name, value, "it must be finite", f"Pass a finite float for `{name}`.")
    return float(value)


def check_noise_multiplier(value: object, name: str = "noise_multiplier") -> float:
    """Noise std in units of the L2 sensitivity; 0 means no noise (infinite epsilon)."""
    sigma = _check_real(name, value)
    if sigma < 0:
        fail(name, value, "a noise standard deviation cannot be negative",
             "Pass a noise multiplier >= 0 (typical DP-SGD values are 0.5 to 10).")
    return sigma


def check_sample_rate(value: object, *, allow_zero: bool = False) -> float:
    """Poisson sampling probability q: each example joins each batch with probability q."""
    q = _check_real("sample_rate", value)
    low_ok = q >= 0 if allow_zero else q > 0
    if not (low_ok and q <= 1):
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        fail("sample_rate", value, f"it is a probability and must lie in {interval}",
             "Pass expected_batch_size / num_samples.")
    return q


def check_steps(value: object, name: str = "steps", *, minimum: int = 0) -> int:
    """A number of mechanism releases (training steps)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        fail(name, value, f"it counts releases and must be an integer >= {minimum}",
             f"Pass the planned number of optimizer steps as an int >= {minimum}.")
    return int(value)


def check_num_samples(value: object) -> int | None:
    """Dataset size N, or None when unknown."""
    if value is None:
        return None
    return check_steps(value, "num_samples", minimum=1)


def check_delta(value: object, num_samples: int | None = None) -> float:
    """Delta of (epsilon, delta)-DP; warns when delta >= 1/N, which permits leaking an example."""
    delta = _check_real("delta", value)
    if not 0 < delta < 1:
        fail("delta", value, "it is a failure probability and must lie in (0, 1)",
             "Pass a delta well below 1/num_samples, e.g. 1e-5 for 60,000 examples.")
    num_samples = check_num_samples(num_samples)
    if num_samples is not None and delta >= 1 / num_samples:
        warnings.warn(
            f"`delta`={delta!r} is >= 1/num_samples = 1/{num_samples}: a mechanism that "
            "publishes a random training example verbatim satisfies this delta, so the "
            "guarantee is meaningless. Use delta < 1/num_samples (e.g. 1/(10 * num_samples)).",
            LargeDeltaWarning,
            stacklevel=3,
        )
    return delta
