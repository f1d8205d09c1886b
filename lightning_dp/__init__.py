"""Differentially private training for PyTorch Lightning."""

import lightning_dp.losses  # noqa: F401  (per-example losses, e.g. sequence_cross_entropy)
from lightning_dp import strategies  # noqa: F401  (registers "dp" in Lightning's StrategyRegistry)
from lightning_dp.callbacks import PrivacyAccountant, PrivacyReport
from lightning_dp.compiling import compile
from lightning_dp.engine import (
    PrivacyLeakError,
    SelfCheckError,
    group_norms,
    group_thresholds,
    make_private,
    self_check,
    self_check_across_ranks,
    sensitivity,
    strip_private,
)
from lightning_dp.exporting import export, privacy_card
from lightning_dp.rules import rules
from lightning_dp.strategies import DPFSDPStrategy, DPStrategy

__all__ = [
    "DPFSDPStrategy",
    "DPStrategy",
    "PrivacyAccountant",
    "PrivacyLeakError",
    "PrivacyReport",
    "SelfCheckError",
    "compile",
    "export",
    "group_norms",
    "group_thresholds",
    "make_private",
    "privacy_card",
    "rules",
    "self_check",
    "self_check_across_ranks",
    "sensitivity",
    "strip_private",
]
