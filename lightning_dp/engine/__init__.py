"""The per-example clipping engine: rewrite a model so backward leaves clipped sums in .grad."""

from lightning_dp.engine.clipper import Clipper, Group, GroupStats
from lightning_dp.engine.make_private import (
    PrivacyLeakError,
    clipper_of,
    group_norms,
    group_thresholds,
    is_private,
    make_private,
    planned_parameters,
    sensitivity,
    strip_private,
)
from lightning_dp.engine.self_check import (
    SelfCheckError,
    SelfCheckReport,
    self_check,
    self_check_across_ranks,
)

__all__ = [
    "Clipper",
    "Group",
    "GroupStats",
    "PrivacyLeakError",
    "clipper_of",
    "group_norms",
    "group_thresholds",
    "is_private",
    "make_private",
    "planned_parameters",
    "self_check",
    "self_check_across_ranks",
    "SelfCheckError",
    "SelfCheckReport",
    "sensitivity",
    "strip_private",
]
