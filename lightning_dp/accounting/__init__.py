"""Privacy accounting for DP-SGD, built on Google's ``dp_accounting``.

Describe the mechanism (Poisson-subsampled Gaussian, composed over steps), then ask an
accountant. The neighbouring relation is add/remove of one example. This package imports
nothing from training.
"""

from lightning_dp.accounting._validation import LargeDeltaWarning
from lightning_dp.accounting.adaptive import (
    count_noise_multiplier_for,
    effective_noise_multiplier,
    gradient_noise_multiplier_for,
)
from lightning_dp.accounting.analysis import Accountant, epsilon
from lightning_dp.accounting.calibration import noise_multiplier_for
from lightning_dp.accounting.ledger import LedgerEntry, PrivacyLedger

__all__ = [
    "Accountant",
    "LargeDeltaWarning",
    "LedgerEntry",
    "PrivacyLedger",
    "count_noise_multiplier_for",
    "effective_noise_multiplier",
    "epsilon",
    "gradient_noise_multiplier_for",
    "noise_multiplier_for",
]
