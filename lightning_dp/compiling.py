"""``lightning_dp.compile``: torch.compile a private model with clipping fused into its backward.

Order of operations: check that every private module can run functionally, switch the clipper to
compiled mode (primitives return clipped gradients to autograd; groups are joined by the graph
pass instead of Python book-keeping), then compile with inductor and the pass installed through
``options`` (inductor applies them with ``config.patch`` for this compilation only).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_dp.engine import deferred_ops
from lightning_dp.engine.compiled_guard import CompiledGradients
from lightning_dp.engine.make_private import _state, refuse_unplanned_trainable

PASS_OPTION = "post_grad_custom_pre_pass"


def prepare_for_compile(model: nn.Module, within: Sequence[nn.Module] | None = None) -> dict[str, Any]:
    """Switch a private model's sites (those inside ``within``; default all) to compiled mode.

    Returns the DP settings that shape the compiled graph (for the pass's ``uuid``).
    """
    state = _state(model)
    clipper = state.clipper
    inside = _modules_inside(within) if within is not None else None
    sites = [site for site in state.sites if inside is None or id(site.module) in inside]
    refused = [f"`{site.path}`" for site in sites if not site.rule.compilable(site.module)]
    if refused:
        raise ValueError(
            f"lightning_dp.compile: modules {refused} use the torch.func fallback (which records "
            "per-call state in the backward) and cannot be compiled yet. Register a rule for them "
            "(@lightning_dp.rules.register), freeze them, or train this model without compile."
        )
    compiled_groups = {group for site in sites for group in site.groups}
    split = sorted({g for site in state.sites if site not in sites for g in site.groups} & compiled_groups)
    if split:
        raise ValueError(
            f"lightning_dp.compile: clipping groups {split} have members inside and outside the "
            "compiled modules; a group must be clipped wholly in one graph. Compile the whole "
            "model, or use groups that stay inside the compiled modules (e.g. clipping='unit')."
        )
    if clipper.id is None:
        clipper.id = deferred_ops.register_clipper(clipper)
    compiled_params = {key for site in sites for key in site.param_keys.values()}
    for site in sites:
        site.compiled = True
    clipper.shared = frozenset(_shared_parameters(state)) | frozenset(clipper.repeated)
    # Compiled primitives return clipped gradients through autograd, which the eager leak guard
    # would reject: a whole compiled model's parameters take the guard that accepts only what
    # their graph computed (``engine/compiled_guard.py``; its caller watches the graphs), those
    # of FSDP's per-block graphs none (the eager step before compiling checks the model).
    state.unguarded |= compiled_params
    if within is None and state.compiled is None:
        state.compiled = CompiledGradients()
    for hook in state.hooks:
        hook.remove()
    state.guard()
    state.layout = None  # the next forward's check arms the guard afresh where it is wanted
    return {
        "clip_fn": clipper.clip_fn_name,
        "gamma": clipper.gamma,
        "groups": {name: clipper.groups[name].params for name in sorted(compiled_groups)},
        "norm_method": clipper.options.norm_method,
        "shared": sorted(clipper.shared),
    }


def _modules_inside(roots: Sequence[nn.Module]) -> set[int]:
    return {id(m) for root in roots for m in root.modules()}


def _with_dp_pass(
    model: nn.Module, compile_kwargs: dict[str, Any], within: Sequence[nn.Module] | None = None
) -> dict[str, Any]:
    """``torch.compile`` keyword arguments with the DP graph pass installed in ``options``."""
    compile_kwargs = dict(compile_kwargs)
    backend = compile_kwargs.get("backend", "inductor")
    if backend != "inductor":
        raise ValueError(
            f"lightning_dp.compile: backend={backend!r}; the DP graph pass runs inside inductor, "
            "so only backend='inductor' is supported."
        )
    from lightning_dp.passes import DPGraphPass

    options = dict(compile_kwargs.pop("options", None) or {})
    if options.get(PASS_OPTION) is not None:
        raise ValueError(
            f"lightning_dp.compile: options[{PASS_OPTION!r}] is already set; lightning-dp needs "
            "that hook for its graph pass. Run your pass through post_grad_custom_post_pass."
        )
    options[PASS_OPTION] = DPGraphPass(prepare_for_compile(model, within))
    return {**compile_kwargs, "options": options}


def compile(model: nn.Module, **compile_kwargs: Any) -> nn.Module:
    """``torch.compile`` a model made private by ``make_private``, with the DP graph pass.

    Per-layer clipping compiles into each layer's backward (norm, scale and weight-gradient
    matmul fused by inductor); flat and group clipping run in the same single backward, their
    weight gradients scheduled after the group's norm reduction. Keyword arguments go to
    ``torch.compile`` (``fullgraph=True`` works); the backend must be inductor.
    """
    _warn_if_never_run_eagerly(model)
    compiled = torch.compile(model, **_with_dp_pass(model, compile_kwargs))
    # the compiled wrapper's own hooks run eagerly, where parameters are the model's own
    compiled.register_forward_pre_hook(_TrainableCheck(model))
    compiled.register_forward_hook(lambda module, args, output: watch_compiled_graphs(model, output))
    return compiled


def watch_compiled_graphs(model: nn.Module, output: Any) -> None:
    """Let the compiled parameters' leak guard know the graphs ``output`` was computed from
    (``lightning_dp.compile`` does this for its output; the strategies for the loss)."""
    compiled = _state(model).compiled
    if compiled is not None and torch.is_grad_enabled():
        compiled.watch(output)


class _TrainableCheck:
    """Before each compiled call with gradients: the trainable parameters are the planned ones
    (a recompilation after unfreezing would otherwise trace the new ones unclipped)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if torch.is_grad_enabled():
            refuse_unplanned_trainable(self.model)


def compile_in_place(module: nn.Module, **compile_kwargs: Any) -> None:
    """As :func:`compile`, but compiles ``module``'s own call (``nn.Module.compile``), so a
    LightningModule keeps its identity and ``self(x)`` in ``training_step`` runs compiled."""
    _warn_if_never_run_eagerly(module)
    module.compile(**_with_dp_pass(module, compile_kwargs))


def compile_submodules(model: nn.Module, modules: Sequence[nn.Module], **compile_kwargs: Any) -> None:
    """Compile the forwards of ``modules`` (e.g. FSDP blocks) in place.

    Only each module's ``forward`` is compiled, so its module hooks (FSDP2's all-gather before
    and reduce-scatter after) stay outside the graph, as per-block compilation under FSDP
    expects. Every clipping group must lie inside one of ``modules`` (the graph pass refuses a
    group whose modules it does not all find in one graph).
    """
    kwargs = _with_dp_pass(model, compile_kwargs, within=modules)
    for module in modules:
        module.forward = torch.compile(module.forward, **kwargs)


def _warn_if_never_run_eagerly(model: nn.Module) -> None:
    """The eager leak guard refuses any gradient that bypassed clipping (a private parameter
    also read outside its module, say in the loss); compiled graphs hand autograd clipped
    gradients, so only an eager step can see such a use. The strategies run one first."""
    if not _state(model).clipper.stats:
        warnings.warn(
            "lightning_dp.compile: this private model has not run an eager training step, so the "
            "leak guard (which refuses gradients that bypass clipping) has not checked it; "
            "compiled graphs cannot. Run one step before compiling (DPStrategy(compile=True) "
            "does), or check the model once with lightning_dp.self_check.",
            stacklevel=3,
        )


def _shared_parameters(state: Any) -> list[str]:
    """Canonical names of parameters reached through more than one private module (a module
    called twice shows only in a forward: the clipper's ``repeated``, from eager steps)."""
    owners: dict[str, int] = {}
    for site in state.sites:
        for canonical in set(site.param_keys.values()):
            owners[canonical] = owners.get(canonical, 0) + 1
    return sorted(name for name, count in owners.items() if count > 1)
