"""Differentially private training for PyTorch Lightning."""

from lightning_dp.engine import (
    PrivacyLeakError,
    group_norms,
    group_thresholds,
    make_private,
    sensitivity,
    strip_private,
)
from lightning_dp.rules import rules

__all__ = [
    "PrivacyLeakError",
    "group_norms",
    "group_thresholds",
    "make_private",
    "rules",
    "sensitivity",
    "strip_private",
]
