"""FSDP2 sharding for DP: one ``fully_shard`` unit per block, summed (not averaged) gradients.

Each unit's per-example clipping finishes inside its own backward, before FSDP2's
post-backward reduce-scatters the unit's gradient, so per-unit and per-layer clipping need no
extra communication. FSDP2 averages gradients over ranks by default; DP-SGD needs the plain
sum of clipped per-example gradients (it divides by the expected batch size q*N later).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

# Module class names treated as transformer blocks when no policy is given.
_BLOCK_NAME_HINTS = ("Block", "Layer", "DecoderLayer", "EncoderLayer")


def default_block_types(model: nn.Module) -> set[type[nn.Module]]:
    """Classes of repeated blocks: children of a ModuleList/Sequential named like a block."""
    types: set[type[nn.Module]] = set()
    for module in model.modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)):
            for child in module.children():
                name = type(child).__name__
                if any(hint in name for hint in _BLOCK_NAME_HINTS) and any(True for _ in child.parameters()):
                    types.add(type(child))
    return types


def is_sharded(model: nn.Module) -> bool:
    return any(isinstance(m, FSDPModule) for m in model.modules())


def nested_units(model: nn.Module) -> list[nn.Module]:
    """The outermost FSDP units inside a root unit (the blocks): disjoint subtrees."""
    units: list[nn.Module] = []

    def visit(module: nn.Module, inside_unit: bool) -> None:
        is_unit = isinstance(module, FSDPModule)
        if is_unit and inside_unit:
            units.append(module)
            return
        for child in module.children():
            visit(child, inside_unit or is_unit)

    visit(model, False)
    return units


def fully_shard_kwargs(mesh: object, mp_policy: MixedPrecisionPolicy | None) -> dict[str, object]:
    """``fully_shard`` keyword arguments: the mesh and mixed precision when given."""
    kwargs: dict[str, object] = {"mesh": mesh} if mesh is not None else {}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    return kwargs


def shard_blocks(
    model: nn.Module,
    mesh: object,
    block_types: Sequence[type[nn.Module]] | None = None,
    mp_policy: MixedPrecisionPolicy | None = None,
) -> None:
    """``fully_shard`` every block (given or detected) below ``model``, innermost first (FSDP2
    shards bottom-up: a unit owns the parameters no unit below it owns)."""
    types = tuple(block_types) if block_types else tuple(default_block_types(model))
    blocks = [m for m in model.modules() if m is not model and types and isinstance(m, types)]
    if block_types and not blocks:
        raise ValueError(
            f"dp_fsdp: block_types={[t.__name__ for t in types]} match no module of "
            f"{type(model).__name__}; pass the classes of its repeated blocks, or None to detect them."
        )
    kwargs = fully_shard_kwargs(mesh, mp_policy)
    for module in reversed(blocks):
        fully_shard(module, **kwargs)


def shard_for_dp(
    model: nn.Module,
    mesh: object,
    block_types: Sequence[type[nn.Module]] | None = None,
    mp_policy: MixedPrecisionPolicy | None = None,
) -> nn.Module:
    """``fully_shard`` every block (given or detected), then the root."""
    shard_blocks(model, mesh, block_types, mp_policy)
    kwargs = fully_shard_kwargs(mesh, mp_policy)
    fully_shard(model, **kwargs)
    return model


def sum_gradients_across_ranks(model: nn.Module) -> None:
    """Make every FSDP unit's reduce-scatter a sum of the ranks' clipped sums."""
    # A divide factor of 1 is a PREMUL_SUM on NCCL; gloo has no PREMUL_SUM, so force SUM there.
    force_sum = dist.is_initialized() and dist.get_backend() == "gloo"
    for module in model.modules():
        if isinstance(module, FSDPModule):
            setter = getattr(module, "set_gradient_divide_factor", None) or module.set_reduce_scatter_divide_factor
            setter(1.0)
            if force_sum:
                module.set_force_sum_reduction_for_comms(True)
