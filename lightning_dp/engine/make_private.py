"""``make_private``: rewrite a model so that backward leaves clipped per-example sums in ``.grad``.

Order of operations: refuse cross-example layers, attach a rule to every module that owns
trainable parameters, partition the parameters into clipping groups, then route each such
module's forward through its rule and guard every parameter against non-private gradients.
"""

from __future__ import annotations

import copy
import math
import sys
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils._pytree import tree_flatten

from lightning_dp.engine.adapters import is_dora_layer, refuse_repeated_prompts
from lightning_dp.engine.clip_fns import ClipFn
from lightning_dp.engine.clipper import Clipper, EngineOptions, Site
from lightning_dp.engine.compiled_guard import CompiledGradients
from lightning_dp.engine.groups import (
    ROOT,
    custom_groups,
    layer_groups,
    unit_groups,
    with_thresholds,
)
from lightning_dp.engine.validation import check_no_cross_example_layers
from lightning_dp.rules import rules
from lightning_dp.rules.func_fallback import FuncFallbackRule
from lightning_dp.rules.norm_method import NormMethod
from lightning_dp.rules.routing import RoutedRule

ClippingStyle = Literal["flat", "layer", "unit"]
ThresholdMode = Literal["fixed", "adaptive"]
GroupSpec = Sequence[Sequence[str]] | Mapping[str, Sequence[str]]
BatchSizeFn = Callable[[tuple, dict], int]

_STATE = "_lightning_dp_state"


class PrivacyLeakError(RuntimeError):
    """A parameter received a gradient that did not pass through per-example clipping."""


@dataclass
class PrivateState:
    clipper: Clipper
    sites: list[Site]
    params: dict[str, Tensor]
    clipping: Any = None
    hooks: list[Any] = field(default_factory=list)
    #: planned parameter name -> the module holding it when the model was made private
    owners: dict[str, nn.Module] = field(default_factory=dict)
    #: The modules :func:`refuse_unplanned_trainable` walks (taken at its first call; a deep
    #: copy takes its own)
    layout: ModuleLayout | None = None
    #: Planned parameters whose clipped gradients arrive through autograd (compiled), which the
    #: leak guard would reject
    unguarded: set[str] = field(default_factory=set)

    #: Compiled graphs' gradients, which the guard of compiled parameters accepts (None: no
    #: such guard, as under FSDP's per-block compilation)
    compiled: CompiledGradients | None = None

    def guard(self) -> None:
        """Arm the leak guard on every trainable parameter."""
        self.hooks = []
        for name, param in self.params.items():
            if param.requires_grad:
                self.arm(name, param)

    def arm(self, name: str, param: Tensor) -> None:
        """Arm the leak guard on ``param``, planned as ``name``, unless it carries it already:
        a new object under a planned name (``load_state_dict(assign=True)``, an unpickled
        model, whose parameters lose their hooks) would otherwise take stray gradients in."""
        if name in self.unguarded:
            if self.compiled is None:
                return
            guard: _LeakGuard = _CompiledLeakGuard(name, self.clipper, self.compiled, param)
        else:
            guard = _LeakGuard(name, self.clipper)
        hooks = param._backward_hooks or {}
        if not any(type(h) is type(guard) and h.clipper is self.clipper for h in hooks.values()):
            self.hooks.append(param.register_hook(guard))

    def __getstate__(self) -> dict[str, Any]:
        # the layout holds weak references, and hooks do not survive pickling: both are made
        # again at the first forward after loading (``refuse_unplanned_trainable``)
        return {**self.__dict__, "layout": None, "hooks": []}

    def __deepcopy__(self, memo: dict) -> PrivateState:
        # Tensor hooks are not copied with tensors: re-arm the guard on the copied parameters.
        copied = PrivateState(
            clipper=copy.deepcopy(self.clipper, memo),
            sites=copy.deepcopy(self.sites, memo),
            params=copy.deepcopy(self.params, memo),
            owners=copy.deepcopy(self.owners, memo),
            unguarded=set(self.unguarded),
            clipping=copy.deepcopy(self.clipping, memo),
        )
        if self.compiled is not None:
            copied.compiled = CompiledGradients()
        copied.guard()
        return copied


def make_private(
    model: nn.Module,
    *,
    clipping: ClippingStyle | GroupSpec = "layer",
    clip_fn: ClipFn = "abadi",
    max_grad_norm: float | Mapping[str, float] = 1.0,
    gamma: float = 0.01,
    norm_method: NormMethod = "auto",
    fallback: bool = False,
    thresholds: ThresholdMode = "fixed",
    batch_size_fn: BatchSizeFn | None = None,
) -> nn.Module:
    """Rewrite ``model`` in place so that backward of a summed loss leaves ``sum_i clip(g_i)``.

    After this, ``(per_example_losses.sum()).backward()`` writes into every trainable
    parameter's ``.grad`` the sum over examples of the clipped per-example gradient. No noise
    is added and nothing is divided: that is the strategy's job. Use ``.backward()`` (a
    backward for inputs only, ``torch.autograd.grad(loss, x)``, leaves ``.grad`` alone;
    ``autograd.grad`` of a parameter is refused) and one forward per backward.

    Examples are a property of the forward, not of a module: a call of the model holds B
    examples (dim 0 of its first tensor input, or ``batch_size_fn``; the strategies set it per
    micro-batch). Every private call must see one row per example, or one row that every
    example shares (HF position ids of shape [1, T]: expanded, so each example's gradient
    through it is its own); any other input is refused naming the module.

    Args:
        model: the model; modules mixing examples (BatchNorm) are refused.
        clipping: ``"flat"`` (one group), ``"layer"`` (one group per module owning parameters;
            modules sharing a parameter are merged), ``"unit"`` (one group per FSDP unit, or per
            top-level child before sharding), or groups of parameter-name prefixes, as a list of
            lists or a mapping group name -> prefixes.
        clip_fn: ``"abadi"`` (``min(1, C/||g||)``) or ``"automatic"`` (``C/(||g||+gamma)``).
        max_grad_norm: threshold C for every group, or a mapping group name -> C.
        gamma: the stabiliser of automatic clipping.
        norm_method: ``"auto"`` picks ghost norm or instantiation per layer by shape,
            ``"measure"`` times both once per layer shape on the running device (fixed shapes;
            the choice may differ between runs); speed only.
        fallback: modules whose own forward uses their parameters in ops no rule stands for
            (``x * self.gain``, a bare ``nn.Parameter`` class token) are handled by the
            ``torch.func`` fallback instead of being refused. Modules whose forward calls
            ``F.linear``/``F.embedding``/``F.conv*``/``F.*_norm`` on their own parameters
            (including subclasses of ``nn.Linear`` etc. that override ``forward``) keep their
            forward with those ops routed to the DP primitives, with or without the fallback.
        thresholds: ``"fixed"``, or ``"adaptive"``: the clipper also keeps each group's centred
            count of examples within its threshold, summed over backwards until
            ``clipper_of(model).take_counts(...)``; ``lightning_dp.thresholds`` releases them
            with noise and moves the thresholds (``max_grad_norm`` is then the initial one).
        batch_size_fn: the number of examples in a call of ``model``, from its
            ``(args, kwargs)``; default: dim 0 of the first tensor argument.

    Returns:
        The same model, rewritten.
    """
    if hasattr(model, _STATE):
        raise ValueError(
            "make_private: this model is already private; call strip_private(model) first to "
            "change its clipping."
        )
    shared = [path for path, module in model.named_modules() if isinstance(vars(module).get("forward"), _PrivateForward)]
    if shared:
        raise ValueError(
            f"make_private: modules {shared[:5]} are already part of another private model (one "
            "that contains them was made private); their calls would be clipped by that model's "
            "engine, apart from this one's groups. Make private only the model you train, or "
            "call strip_private on the other first."
        )
    _check_choice("clip_fn", clip_fn, ClipFn)
    _check_choice("norm_method", norm_method, NormMethod)
    _check_choice("thresholds", thresholds, ThresholdMode)
    if isinstance(clipping, str):
        _check_choice("clipping", clipping, ClippingStyle)
    if not (math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"make_private: gamma is {gamma!r}; it must be positive and finite.")

    check_no_cross_example_layers(model)
    refuse_repeated_prompts(model)
    canonical, aliases = _canonical_names(model)
    planned = _plan_sites(model, canonical, fallback)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    groups = _resolve_groups(model, clipping, planned, trainable, aliases)
    clipper = Clipper(with_thresholds(groups, max_grad_norm), clip_fn, gamma, EngineOptions(norm_method))
    clipper.count_within = thresholds == "adaptive"

    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    owners = {_joined(prefix, name): module for prefix, module in model.named_modules()
              for name in module._parameters if _joined(prefix, name) in params}
    state = PrivateState(clipper=clipper, sites=[], params=params, clipping=clipping, owners=owners)
    for index, (path, module, rule, keys) in enumerate(planned):
        site = Site(
            path=path or ROOT, module=module, rule=rule, clipper=clipper, param_keys=keys, index=index
        )
        site.groups = sorted({clipper.group_of[k] for k in keys.values()})
        for group in site.groups:
            clipper.group_sites[group].add(index)
        _route_forward(site)
        state.sites.append(site)
    state.guard()
    model.register_forward_pre_hook(
        _CountExamples(clipper, batch_size_fn or first_batch_dim), with_kwargs=True
    )
    model.register_forward_hook(_ExplainFailure(clipper), always_call=True)
    clipper.plan_check = _PlanCheckAfterBackward(model)
    setattr(model, _STATE, state)
    return model


def strip_private(model: nn.Module) -> nn.Module:
    """Undo :func:`make_private`: restore every forward and remove the gradient guards."""
    state = _state(model)
    for site in state.sites:
        del site.module.forward  # the instance attribute set by _route_forward
        if site.shadowed_forward:  # the module already had an instance-level forward
            site.module.forward = site.original_forward
    for hook in state.hooks:
        hook.remove()
    # found by type rather than by handle: a deep copy of the model carries its own copy
    for key, hook in list(model._forward_pre_hooks.items()):
        if isinstance(hook, _CountExamples):
            del model._forward_pre_hooks[key]
            model._forward_pre_hooks_with_kwargs.pop(key, None)
    for key, hook in list(model._forward_hooks.items()):
        if isinstance(hook, _ExplainFailure):
            del model._forward_hooks[key]
            model._forward_hooks_always_called.pop(key, None)
    delattr(model, _STATE)
    return model


def is_private(model: nn.Module) -> bool:
    return hasattr(model, _STATE)


def planned_parameters(model: nn.Module) -> dict[str, Tensor]:
    """The parameters the clipper writes: those trainable when the model was made private."""
    return _state(model).params


def clipper_of(model: nn.Module) -> Clipper:
    return _state(model).clipper


def group_norms(model: nn.Module) -> dict[str, Tensor]:
    """Per-example pre-clipping norm of each group from the last backward, shape [B]."""
    return {name: stats.norms for name, stats in _state(model).clipper.stats.items()}


def group_thresholds(model: nn.Module) -> dict[str, float]:
    return {name: g.threshold for name, g in _state(model).clipper.groups.items()}


def sensitivity(model: nn.Module) -> float:
    """L2 sensitivity of the summed clipped gradient under add/remove of one example.

    Groups are disjoint sets of parameters (shared parameters merge their groups), each
    contributing at most its threshold: ``sqrt(sum_k C_k^2)``.
    """
    return math.sqrt(sum(g.threshold**2 for g in _state(model).clipper.groups.values()))


def _state(model: nn.Module) -> PrivateState:
    state = getattr(model, _STATE, None)
    if state is None:
        raise ValueError(
            f"{type(model).__name__} is not private; call lightning_dp.make_private(model) first."
        )
    return state


def _check_choice(name: str, value: Any, choices: Any) -> None:
    allowed = get_args(choices)
    if value not in allowed:
        raise ValueError(f"make_private: {name}={value!r} is not one of {list(allowed)}.")


def _canonical_names(model: nn.Module) -> tuple[dict[int, str], dict[str, str]]:
    """id(param) -> its first name, and every other name (tied alias) -> that first name."""
    canonical: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in canonical:
            aliases[name] = canonical[id(param)]
        else:
            canonical[id(param)] = name
    return canonical, aliases


def _plan_sites(model: nn.Module, canonical: dict[int, str], fallback: bool):
    """(path, module, rule, {local name: canonical name}) for every module owning trainable params.

    A module of a registered class runs through its rule; one whose class overrides the
    registered class's ``forward``, or that has no rule, keeps its own forward with its
    parametric ops routed to the primitives (``rules/routing.py``). A module whose forward
    reads its parameters in a way no rule's op sees (see :func:`_recomputed_whole`) is handled
    whole by the torch.func fallback, or refused.
    """
    planned, covered, refused = [], [], []
    for path, module in model.named_modules():
        if any(path == c or path.startswith(c + ".") for c in covered):
            continue
        direct = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        rule = rules.lookup(module)
        why = _recomputed_whole(module)
        if why is not None:
            names = [n for n, p in module.named_parameters() if p.requires_grad]
            covered.append(path)
            if not fallback:
                refused.append((path, module, names, why))
                continue
            rule = FuncFallbackRule(covers_subtree=True)
        elif rule is not None and not rules.keeps_own_forward(module):
            rule.validate(module, path or ROOT)
            names = rule.param_names(module)
            unhandled = sorted(set(direct) - set(names))
            if unhandled and not fallback:
                refused.append((path, module, unhandled, ""))
                continue
            if unhandled:
                rule, names = RoutedRule(fallback=True), direct
            if rule.covers_subtree:
                covered.append(path)
        elif direct:
            rule, names = RoutedRule(fallback), direct
        else:
            continue
        if names:
            keys = {n: canonical[id(module.get_parameter(n))] for n in names}
            planned.append((path, module, rule, keys))
    if refused:
        lines = "\n".join(
            f"  `{path or ROOT}` ({type(m).__name__}): {names}" + (f" ({why})" if why else "")
            for path, m, names, why in refused
        )
        raise ValueError(
            "make_private: these modules own trainable parameters that their class's rule does "
            f"not handle, so their gradients could not be clipped:\n{lines}\nRegistered rules: "
            f"{rules.registered_types()}. Pass fallback=True to handle them with the torch.func "
            "fallback, register a rule with @lightning_dp.rules.register(YourModule), or freeze "
            "them with requires_grad_(False)."
        )
    return planned


def _recomputed_whole(module: nn.Module) -> str | None:
    """Why ``module`` must be recomputed whole by the torch.func fallback, or None.

    A parametrized module (``weight_norm``, ``spectral_norm``) computes its weight from other
    parameters at every call, so its class's rule would see a tensor that is no parameter. A
    parameter container (``nn.ParameterDict``, as peft's LoRA on an embedding layer and IA3 keep
    their factors) has no forward: its parent's forward reads it. A peft DoRA layer also calls
    its LoRA factors on an identity matrix (``engine/adapters.py``).
    """
    if is_dora_layer(module):
        return ("a peft DoRA layer: it also calls lora_A and lora_B on an identity matrix, whose "
                "rows are no examples; or use LoRA without DoRA (use_dora=False)")
    if parametrize.is_parametrized(module):
        return "its weight is computed from other parameters at every call"
    containers = [name for name, child in module.named_children()
                  if isinstance(child, (nn.ParameterDict, nn.ParameterList))
                  and any(p.requires_grad for p in child.parameters())]
    if containers:
        return (f"its forward reads trainable parameters held in {containers}, parameter "
                "containers no rule's op sees (peft's LoRA on an embedding layer, IA3)")
    return None


def _resolve_groups(model, clipping, planned, trainable, aliases) -> dict[str, list[str]]:
    if clipping == "flat":
        return {"flat": trainable}
    if clipping == "layer":
        return layer_groups({path: sorted(set(keys.values())) for path, _, _, keys in planned})
    if clipping == "unit":
        return unit_groups(model, trainable)
    if isinstance(clipping, str) or not isinstance(clipping, (Sequence, Mapping)):
        raise ValueError(f"make_private: clipping={clipping!r} is not a style or a group list.")
    return custom_groups(clipping, trainable, aliases)


class _PrivateForward:
    """The forward installed on a module: its rule while training, the original otherwise.

    An object rather than a closure so that ``copy.deepcopy`` of a private model copies the
    site along with the module, and the copy computes with its own parameters.
    """

    def __init__(self, site: Site) -> None:
        self.site = site

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        site = self.site
        if not site.active():
            return site.original_forward(*args, **kwargs)
        return site.rule.forward(site, site.module, *args, **kwargs)


def _route_forward(site: Site) -> None:
    site.shadowed_forward = "forward" in vars(site.module)
    site.original_forward = site.module.forward
    site.module.forward = _PrivateForward(site)


def first_batch_dim(args: tuple, kwargs: dict) -> int | None:
    """Examples in a call: dim 0 of its first tensor argument (positional, then keyword)."""
    if args and isinstance(args[0], Tensor) and args[0].dim() > 0:
        return args[0].shape[0]  # the common case, without flattening (once per forward)
    for leaf in tree_flatten((args, kwargs))[0]:
        if isinstance(leaf, Tensor) and leaf.dim() > 0:
            return leaf.shape[0]
    return None


def _from_transformers(module: nn.Module) -> bool:
    """A Hugging Face model (or a peft wrapper of one), without importing either."""
    return type(module).__module__.split(".")[0] in ("transformers", "peft")


class _CountExamples:
    """Forward pre-hook on the root model: each call of it starts a forward over this many
    examples (unless a strategy has pinned the count to its micro-batch), with the trainable
    parameters the clipping groups were planned for."""

    def __init__(self, clipper: Clipper, batch_size_fn: BatchSizeFn) -> None:
        self.clipper, self.batch_size_fn = clipper, batch_size_fn
        self.warned_labels = False

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        clipper = self.clipper
        clipper.forget_interrupted_backward()
        if not torch.compiler.is_compiling():
            clipper.expanded.clear()
        if clipper.examples_pinned or not (clipper.enabled and torch.is_grad_enabled()):
            return  # pinned: a strategy runs the step (and refuses a loss that mixes examples)
        if kwargs.get("labels") is not None and not self.warned_labels and _from_transformers(module):
            self.warned_labels = True
            warnings.warn(
                f"lightning-dp: {type(module).__name__} was called with labels=, so its `loss` is "
                "Hugging Face's mean over the batch's tokens (or examples). Its denominator is "
                "counted from the whole batch, so each example's gradient depends on the others "
                "and clipping does not bound one example's influence (a probe measured 1.02 S "
                "removing one example). Backpropagate per-example losses summed over the batch "
                "instead, e.g. lightning_dp.losses.sequence_cross_entropy(out.logits[:, :-1], "
                "labels[:, 1:]).sum() for a causal LM (-100 at padding); lightning_dp.self_check "
                "tests a loss function.",
                stacklevel=2,
            )
        if not torch.compiler.is_compiling():
            refuse_unplanned_trainable(module)
        elif clipper.id is None:  # plain torch.compile; lightning_dp.compile checks outside
            _refuse_unplanned_trainable_eagerly(module)
        clipper.examples = self.batch_size_fn(args, kwargs)
        clipper.root_forward_ended = False


class _ExplainFailure:
    """Forward hook on the root model that also runs when the forward raises (``always_call``).
    It marks the root's forward as ended (a later submodule call starts a forward of its own),
    and an error raised after a one-row input was expanded to the batch gets a note naming
    those calls, which the error itself (a shape mismatch deep in the model's code) does not
    show."""

    def __init__(self, clipper: Clipper) -> None:
        self.clipper = clipper

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        if torch.compiler.is_compiling():
            return
        self.clipper.root_forward_ended = not self.clipper.examples_pinned
        error = sys.exc_info()[1]
        expanded = self.clipper.expanded
        if error is None or not expanded or not hasattr(error, "add_note"):  # add_note: 3.11+
            return
        if any(note.startswith("lightning-dp expanded") for note in getattr(error, "__notes__", [])):
            return  # a nested private model already said it
        calls = ", ".join(f"`{path}` (input {list(shape)})" for path, shape in expanded.items())
        error.add_note(
            f"lightning-dp expanded the one-row inputs of {calls} to the forward's "
            f"{self.clipper.examples} examples before this error, so those calls' outputs have "
            "one row per example where the plain model's have one. That is what lets each "
            "example's gradient through them be clipped, and code that broadcasts such an output "
            "is exact; code that indexes its row or repeats it per example itself (DeBERTa's "
            "relative embeddings through its position projections) is not supported. Freeze the "
            "modules whose output the model does not simply broadcast (requires_grad_(False); "
            "the README's layer table has DeBERTa's) to train the rest privately."
        )


class ModuleLayout:
    """A model's modules with their names, children and planned parameters (those a module
    held when the model was made private), as ``named_modules()`` gave them.

    The plan is checked at every forward; walking this list, with each module's own parameters
    looked up afresh, costs a quarter of ``named_parameters()`` (about 50 us of a small GPT's
    forward on the CPU). A module whose children changed since (a layer replaced or added, a
    wrapper inserted) makes :meth:`check` return None, and the caller takes the layout anew.
    """

    def __init__(self, model: nn.Module, owners: Mapping[str, nn.Module]) -> None:
        self.modules = [
            (module, prefix, dict(module._modules),
             {n: _joined(prefix, n) for n in module._parameters if owners.get(_joined(prefix, n)) is module})
            for prefix, module in model.named_modules()
        ]
        #: planned name -> the parameter object last seen there, known to carry a leak guard
        self._guarded: dict[str, weakref.ref] = {}

    def check(self, arm: Callable[[str, Tensor], None]) -> tuple[list[str], list[str]] | None:
        """``(unplanned, tied)``: trainable parameters not planned (new, or held by a module put
        in since), named as ``named_parameters()`` names them; and planned parameters that are
        now the same tensor as another planned one (tied since). ``arm(name, param)`` is called
        for each trainable planned parameter whose object is not the one last seen there
        (``load_state_dict(assign=True)``, an unpickled model). None when out of date."""
        unplanned, tied, seen = [], [], set()
        for module, prefix, children, planned in self.modules:
            if module._modules != children:
                return None
            for name, param in module._parameters.items():
                if param is None:
                    continue
                full = planned.get(name)
                if id(param) in seen:  # reached before: tied (named once, by its first module)
                    if full is not None:
                        tied.append(full)
                    continue
                seen.add(id(param))
                if full is None:
                    if param.requires_grad:
                        unplanned.append(_joined(prefix, name))
                    continue
                last = self._guarded.get(full)
                if param.requires_grad and (last is None or last() is not param):
                    arm(full, param)
                    self._guarded[full] = weakref.ref(param)
        return unplanned, tied


def _joined(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def refuse_unplanned_trainable(model: nn.Module) -> None:
    """Check the model against its plan before a forward with gradients: raise when a parameter
    became trainable after ``make_private`` (it is in no clipping group, and a module that had
    no trainable parameter runs its plain forward, so its gradient would land unclipped), when
    two planned parameters were tied since (their uses would be normed apart), or when a layer
    that mixes examples was put in; and arm the leak guard on planned parameters that are new
    objects under their old names."""
    state = _state(model)
    found = state.layout.check(state.arm) if state.layout is not None else None
    if found is None:  # by name: FSDP2 swaps parameter objects around forwards
        check_no_cross_example_layers(model)
        state.layout = ModuleLayout(model, state.owners)
        found = state.layout.check(state.arm)
    unplanned, tied = found
    if tied:
        raise ValueError(
            f"make_private: parameters {tied[:5]} were tied to other parameters after the model "
            "was made private; the plan counts them as separate parameters, so each example's "
            "gradient through them would be normed in parts, not as one sum. Tie weights before "
            "make_private, or call strip_private(model) and make_private(model, ...) again."
        )
    if unplanned:
        raise ValueError(
            f"make_private: parameters {unplanned[:5]}{' ...' if len(unplanned) > 5 else ''} "
            "became trainable after the model was made private, or belong to a module put in "
            "the model since, so no clipping group covers them and their gradients would not be "
            "clipped. Change requires_grad and replace modules before make_private, or call "
            "strip_private(model) and make_private(model, ...) again after the change (the DP "
            "strategies re-plan by themselves)."
        )


class _PlanCheckAfterBackward:
    """The plan check again at the end of every backward: a module made trainable after
    ``make_private`` and called directly (not through the root model, whose forward checks)
    has just had its gradient accumulated unclipped, so the step must not go on."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self) -> None:
        if not is_private(self.model):  # stripped between its forward and this backward
            return
        try:
            refuse_unplanned_trainable(self.model)
        except ValueError as error:
            raise PrivacyLeakError(
                f"{error} This backward has already accumulated their gradients, unclipped, in "
                "`.grad`: do not step the optimizer on them."
            ) from error


#: Run outside the traced graph (a graph break before the model's forward), so that the check
#: runs at every call and not only when the graph is traced. The reason is what dynamo shows a
#: user who compiled the private model with torch.compile(..., fullgraph=True), where
#: torch.compiler.disable takes one.
_EAGER_CHECK = (
    "lightning-dp checks the private model's trainable parameters outside the graph at every "
    "forward; compile a private model with lightning_dp.compile(model) or "
    "DPStrategy(compile=True), or torch.compile without fullgraph=True"
)
try:
    _refuse_unplanned_trainable_eagerly = torch.compiler.disable(refuse_unplanned_trainable, reason=_EAGER_CHECK)
except TypeError:  # an older torch: no reason
    _refuse_unplanned_trainable_eagerly = torch.compiler.disable(refuse_unplanned_trainable)


class _LeakGuard:
    """A hook on a parameter's incoming gradient: DP primitives hand autograd ``None`` for
    parameters (the clipper writes ``.grad`` itself), so any defined gradient arriving here
    bypassed clipping. Plain passes with the clipper disabled (the self-check) are exempt."""

    def __init__(self, name: str, clipper: Clipper) -> None:
        self.name, self.clipper = name, clipper

    def __call__(self, grad: Tensor | None) -> None:
        if grad is None or not self.clipper.enabled:
            return
        raise PrivacyLeakError(
            f"Parameter `{self.name}` received a gradient that bypassed per-example clipping: it "
            "is used outside its module's forward (e.g. read directly in another module or in "
            "the loss), or inside it through code the routing cannot follow (a custom "
            "autograd.Function). That gradient would be released without privacy. Use the "
            "parameter only through its module, enable fallback=True when another module's "
            "forward reads it, or register a rule for a module with its own autograd.Function. "
            "A term of the loss that reads parameters directly (an L2 penalty, a regulariser) "
            "does not depend on the data: put it in the optimizer instead (weight_decay)."
        )


class _CompiledLeakGuard(_LeakGuard):
    """The guard of a compiled parameter: its incoming gradient must be the one its compiled
    graph computed (``engine/compiled_guard.py``), nothing summed with it."""

    def __init__(self, name: str, clipper: Clipper, compiled: CompiledGradients, param: Tensor) -> None:
        super().__init__(name, clipper)
        self.compiled, self.param = compiled, weakref.ref(param)

    def __call__(self, grad: Tensor | None) -> None:
        param = self.param()
        if grad is None or not self.clipper.enabled or param is None:
            return
        if self.compiled.came_from_graph(param, grad):
            return
        raise PrivacyLeakError(
            f"Parameter `{self.name}` of a compiled private model received a gradient that did "
            "not come (only) from its compiled graph: it is also read outside its module (in the "
            "loss, say; a term switched on after the first, eager step is not checked there), or "
            "the compiled model ran twice before this backward. That part bypassed per-example "
            "clipping and would be released without a per-example bound. Compute the term from a "
            "private module's output, or train that phase eagerly, where it is refused at once."
        )
