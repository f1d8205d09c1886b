"""The registry that maps module types to per-example gradient rules."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from torch import nn

if TYPE_CHECKING:
    from lightning_dp.rules.base import Rule

R = TypeVar("R", bound="type[Rule]")


ModuleKey = type[nn.Module] | str


def _dotted(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class RuleRegistry:
    """Module type -> rule, looked up along ``type(module).__mro__`` so subclasses are covered.

    A type may also be registered by its dotted name (``"transformers.pytorch_utils.Conv1D"``),
    so that optional libraries are never imported just to register a rule for them.
    """

    def __init__(self) -> None:
        self._rules: dict[str, Rule] = {}

    def register(self, *module_types: ModuleKey, override: bool = False) -> Callable[[R], R]:
        """Class decorator: ``@rules.register(nn.Linear)`` registers an instance of the rule."""

        def decorate(rule_cls: R) -> R:
            for module_type in module_types:
                key = module_type if isinstance(module_type, str) else _dotted(module_type)
                if key in self._rules and not override:
                    raise ValueError(
                        f"A per-example rule for {key} is already registered "
                        f"({type(self._rules[key]).__qualname__}); pass override=True to "
                        "rules.register(...) to replace it."
                    )
                self._rules[key] = rule_cls()
            return rule_cls

        return decorate

    def lookup(self, module: nn.Module) -> Rule | None:
        """The rule of the nearest registered class in the module's MRO, or None."""
        found = self.resolve(module)
        return found[1] if found is not None else None

    def resolve(self, module: nn.Module) -> tuple[type[nn.Module], Rule] | None:
        """The nearest registered class in the module's MRO and its rule, or None."""
        for cls in type(module).__mro__:
            rule = self._rules.get(_dotted(cls))
            if rule is not None:
                return cls, rule
        return None

    def keeps_own_forward(self, module: nn.Module) -> bool:
        """True when the module's class overrides ``forward`` below its registered class: its
        rule would compute another function, so the module's own forward must run."""
        found = self.resolve(module)
        return found is not None and type(module).forward is not found[0].forward

    def registered_types(self) -> list[str]:
        """Registered class names (without their module)."""
        return sorted(key.rsplit(".", 1)[-1] for key in self._rules)


rules = RuleRegistry()
