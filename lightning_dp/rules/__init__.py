"""Per-example gradient rules, one file per layer family, in one registry.

Add a layer type with ``@rules.register(MyModule)`` on a :class:`Rule` subclass whose forward
routes the module's parameters through a DP primitive (see ``linear.py`` for the pattern).
"""

from lightning_dp.rules import (  # noqa: F401  (importing registers the rules)
    conv,
    embedding,
    gpt2_conv1d,
    group_norm,
    instance_norm,
    layer_norm,
    linear,
    mha,
    recurrent,
    rms_norm,
)
from lightning_dp.rules.base import GradUse, Rule
from lightning_dp.rules.func_fallback import FuncFallbackRule
from lightning_dp.rules.registry import RuleRegistry, rules

__all__ = ["FuncFallbackRule", "GradUse", "Rule", "RuleRegistry", "rules"]
