"""The registry that maps module types to per-example gradient rules."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from torch import nn

if TYPE_CHECKING:
    from lightning_dp.rules.base import Rule

R = TypeVar("R", bound="type[Rule]")


class RuleRegistry:
    """Module type -> rule, looked up along ``type(module).__mro__`` so subclasses are covered."""

    def __init__(self) -> None:
        self._rules: dict[type[nn.Module], Rule] = {}

    def register(self, *module_types: type[nn.Module], override: bool = False) -> Callable[[R], R]:
        """Class decorator: ``@rules.register(nn.Linear)`` registers an instance of the rule."""

        def decorate(rule_cls: R) -> R:
            for module_type in module_types:
                if module_type in self._rules and not override:
                    raise ValueError(
                        f"A per-example rule for {module_type.__qualname__} is already registered "
                        f"({type(self._rules[module_type]).__qualname__}); pass override=True to "
                        "rules.register(...) to replace it."
                    )
                self._rules[module_type] = rule_cls()
            return rule_cls

        return decorate

    def lookup(self, module: nn.Module) -> Rule | None:
        """The rule of the nearest registered class in the module's MRO, or None."""
        for cls in type(module).__mro__:
            rule = self._rules.get(cls)
            if rule is not None:
                return rule
        return None

    def registered_types(self) -> list[str]:
        return sorted(t.__qualname__ for t in self._rules)


rules = RuleRegistry()
