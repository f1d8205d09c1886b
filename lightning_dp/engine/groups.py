"""Partition the trainable parameters into clipping groups, each with its threshold.

Groups are sets of *parameters* (deduplicated: a tied weight has one canonical name), so they
are disjoint and the L2 sensitivity of the summed clipped gradient is ``sqrt(sum_k C_k^2)``.
Modules that share a parameter (a tied embedding and LM head) fall into one group, whose
per-example norm is that of the shared parameter's true per-example gradient: the sum over its
uses.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from torch import nn

from lightning_dp.engine.clipper import Group

ROOT = "(root)"


def _display(path: str) -> str:
    return path or ROOT


def layer_groups(site_params: dict[str, list[str]]) -> dict[str, list[str]]:
    """One group per module with a rule; modules sharing a parameter are merged."""
    parent: dict[str, str] = {path: path for path in site_params}

    def find(path: str) -> str:
        while parent[path] != path:
            parent[path] = parent[parent[path]]
            path = parent[path]
        return path

    owner: dict[str, str] = {}
    for path, params in site_params.items():
        for param in params:
            if param in owner:
                parent[find(path)] = find(owner[param])
            else:
                owner[param] = path
    members: dict[str, list[str]] = {}
    for path in site_params:
        members.setdefault(find(path), []).append(path)
    groups = {}
    for paths in members.values():
        params = sorted({p for path in paths for p in site_params[path]})
        groups["+".join(_display(p) for p in paths)] = params
    return groups


def unit_groups(model: nn.Module, params: list[str]) -> dict[str, list[str]]:
    """One group per FSDP unit (modules ``fully_shard`` was applied to), else per top-level child."""
    units = _fsdp_units(model) or [name for name, _ in model.named_children()]
    groups: dict[str, list[str]] = {}
    for param in params:
        unit = max((u for u in units if param.startswith(u + ".")), key=len, default="")
        groups.setdefault(_display(unit), []).append(param)
    return groups


def _fsdp_units(model: nn.Module) -> list[str]:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch built without distributed
        return []
    return [path for path, m in model.named_modules() if path and isinstance(m, FSDPModule)]


def custom_groups(
    spec: Sequence[Sequence[str]] | Mapping[str, Sequence[str]],
    params: list[str],
    aliases: dict[str, str],
) -> dict[str, list[str]]:
    """Groups given as parameter-name prefixes; every trainable parameter in exactly one.

    A tied parameter is matched by its canonical name (its first name in ``named_parameters``);
    its other names are consulted only when the canonical one matches no group.
    """
    named = dict(spec) if isinstance(spec, Mapping) else {",".join(p): p for p in spec}
    groups: dict[str, list[str]] = {name: [] for name in named}

    def matching(name: str) -> list[str]:
        return [
            group for group, prefixes in named.items()
            if any(name == pre or name.startswith(pre + ".") for pre in prefixes)
        ]

    for param in params:
        hits = matching(param)
        for alias in (a for a, canon in aliases.items() if canon == param and not hits):
            hits = matching(alias)
        if len(hits) > 1:
            raise ValueError(
                f"clipping: parameter {param!r} matches several groups {hits}; groups must be "
                "disjoint, so make the prefixes more specific."
            )
        if not hits:
            raise ValueError(
                f"clipping: parameter {param!r} matches no group of {list(named)}; every "
                "trainable parameter must be in exactly one group. Add its prefix to a group, "
                "or freeze it with requires_grad_(False)."
            )
        groups[hits[0]].append(param)
    empty = [name for name, members in groups.items() if not members]
    if empty:
        raise ValueError(
            f"clipping: groups {empty} match no trainable parameter; check the prefixes against "
            "model.named_parameters()."
        )
    return groups


def with_thresholds(
    groups: dict[str, list[str]], max_grad_norm: float | Mapping[str, float]
) -> list[Group]:
    """Attach a threshold to every group; a mapping must name exactly the groups."""
    if isinstance(max_grad_norm, Mapping):
        missing = sorted(set(groups) - set(max_grad_norm))
        unknown = sorted(set(max_grad_norm) - set(groups))
        if missing or unknown:
            raise ValueError(
                f"max_grad_norm: thresholds given for {sorted(max_grad_norm)}, but the groups are "
                f"{sorted(groups)} (missing {missing}, unknown {unknown}); give one float for all "
                "groups or a threshold for each group name."
            )
        thresholds = dict(max_grad_norm)
    else:
        thresholds = {name: max_grad_norm for name in groups}
    for name, value in thresholds.items():
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(
                f"max_grad_norm: the threshold of group {name!r} is {value!r}; it must be a "
                "positive finite number."
            )
    return [Group(name, params, float(thresholds[name])) for name, params in groups.items()]
