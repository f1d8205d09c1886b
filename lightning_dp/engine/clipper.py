"""Per-backward book-keeping: collect each group's gradient factors, clip, write ``.grad``.

Every call of a DP primitive in a forward pass is counted as *pending* for the groups its
parameters belong to. As each call's backward runs it hands over a :class:`GradUse`; when a
group has no pending calls left its per-example norms are known, so it is clipped and its
gradients written at once, inside that backward. Per-layer groups therefore finish in their own
layer's backward (clipping fused into backprop); flat and custom groups hold their factors only
until their last member has run (book-keeping), in the same single backward pass. A callback at
the end of every backward finishes groups whose remaining calls never received a gradient.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lightning_dp.engine.clip_fns import CLIP_FNS
from lightning_dp.engine.deferred_ops import group_scale, shared_scale
from lightning_dp.engine.requested import parameter_requested
from lightning_dp.engine.shared_norms import norm_sq_of_sum
from lightning_dp.rules.base import Rule, in_dtype, settle_factors_
from lightning_dp.rules.protocol import GradUse, examples_per_chunk, row_norm_sq, upcast


class ExampleMismatchError(ValueError):
    """A private call's input rows cannot be mapped to the examples of the forward."""


@dataclass
class Group:
    """Parameters clipped together, to one threshold."""

    name: str
    params: list[str]
    threshold: float


@dataclass
class GroupStats:
    """What the last backward saw for one group (for logging and adaptive thresholds).

    Only the norms are kept in the backward (the counts are computed when read), and counts stay
    tensors so that reading them is the caller's choice of a device sync.
    """

    norms: Tensor
    threshold: float

    @property
    def clipped(self) -> Tensor:
        return (self.norms > self.threshold).sum()

    @property
    def nonfinite(self) -> Tensor:
        return (~torch.isfinite(self.norms)).sum()


@dataclass(frozen=True)
class EngineOptions:
    """Settings that change speed only, never the result (kept out of the privacy card)."""

    norm_method: str = "auto"


@dataclass(eq=False)
class Site:
    """A module whose forward runs through a rule, and how its parameters map to groups."""

    path: str
    module: nn.Module
    rule: Rule
    clipper: Clipper
    #: local parameter name -> canonical (deduplicated) parameter name in the model
    param_keys: dict[str, str]
    #: position among the model's sites (names the call in compiled graphs)
    index: int = 0
    #: Set by ``lightning_dp.compile``: this site's primitive returns clipped gradients to
    #: autograd and its groups are joined by the graph pass instead of the book-keeping below.
    compiled: bool = False
    original_forward: object = None
    shadowed_forward: bool = False
    groups: list[str] = field(default_factory=list)

    @property
    def options(self) -> EngineOptions:
        return self.clipper.options

    @property
    def spare_workspace(self) -> int:
        return self.clipper._released

    def active(self) -> bool:
        return torch.is_grad_enabled() and self.clipper.enabled

    def announce(self) -> None:
        """Count one primitive call, whose backward hands over one gradient (:meth:`record`);
        the clipper waits for every call announced before it clips their groups."""
        if not self.compiled:
            self.clipper.on_forward(self)

    def rows_are_examples(self, rows: int, what: str = "input", carries_grad: bool = False) -> bool:
        """True when ``rows`` is the forward's example count, False when it is 1 (one row shared
        by every example); refuses anything else. See :meth:`Clipper.rows_are_examples`."""
        return self.clipper.rows_are_examples(self, rows, what, carries_grad)

    def holds_examples(self, rows: int) -> bool:
        """See :meth:`CallSite.holds_examples`: the test of :meth:`enter`, without raising."""
        examples = self.clipper.examples
        return rows == 1 or examples is None or rows == examples

    def enter(self, x: Tensor, dim: int = 0) -> Tensor:
        """Announce a primitive call on input ``x``; a row shared by every example is expanded to
        the batch, so that each example's gradient through this call can be taken apart."""
        self.announce()
        if x.shape[dim] == self.clipper.examples:  # the common case, without formatting a message
            return x
        if not self.is_shared_row(x, dim):
            return x
        shape = list(x.shape)
        if not torch.compiler.is_compiling():
            self.clipper.expanded[self.path] = tuple(shape)
        shape[dim] = self.clipper.examples
        return x.expand(shape)

    def is_shared_row(self, x: Tensor, dim: int = 0) -> bool:
        """False for an input with one row per example, True for one row every example shares;
        refuses anything else, and one example's row sliced from the batch."""
        if self.rows_are_examples(x.shape[dim], f"input of shape {tuple(x.shape)}", x.requires_grad):
            return False
        self.refuse_row_of_batch(x, dim)
        return True

    def refuse_row_of_batch(self, x: Tensor, dim: int = 0) -> None:
        """Refuse a one-row input sliced from a tensor holding the forward's examples.

        ``x[:1]`` (an "anchor" example every other one is compared with) or ``x[i:i+1]`` (a loop
        over examples) is one example's data, not a row every example shares: expanded to the
        batch, every example's clipped gradient would carry example 0's data, and leaving that
        one example out could move the clipped sum by up to B thresholds. Seen through the
        view relation, so a slice of a copy (``x[:1].clone()``) is not found; the strategies'
        self-check compares with single-example passes and finds that too.
        """
        if torch.compiler.is_compiling() or not x._is_view():
            return
        base, examples = x._base, self.clipper.examples
        if base.dim() != x.dim() or base.shape[dim] != examples:
            return
        raise ExampleMismatchError(
            f"`{self.path}` ({type(self.module).__name__}) was called with one row "
            f"(shape {tuple(x.shape)}) sliced from a tensor of shape {tuple(base.shape)} that "
            f"holds this forward's {examples} examples, such as `x[:1]` or `x[i:i+1]`. That row "
            "is one example's data: lightning-dp would treat it as a row every example shares, "
            "so every example's gradient would carry that example's data and its influence "
            "would not be bounded by the threshold. Call the layer on the whole batch (one row "
            "per example; a loop over examples is not needed), or, if the row does not depend "
            "on the data (positions built per example), build it on its own, e.g. "
            "torch.arange(T).unsqueeze(0)."
        )

    def record(self, use: GradUse) -> dict[str, Tensor] | None:
        """Hand over one call's gradient factors. Eager: the clipper writes ``.grad`` later and
        this returns None. Compiled: returns the clipped parameter gradients for autograd."""
        if self.compiled:  # autograd delivers the clipped gradients: it decides who gets them
            return self.clipper.deferred_grads(self, use)
        first = next(iter(use.params.values()), None)
        if first is not None and not parameter_requested(first):
            self.clipper.on_unrequested_backward(self)  # autograd.grad(loss, x): no .grad
            return None
        self.clipper.on_backward(self, use)
        return None


class Clipper:
    """Clips per-example group gradients of one private model and accumulates them in ``.grad``."""

    def __init__(
        self, groups: list[Group], clip_fn: str, gamma: float, options: EngineOptions
    ) -> None:
        self.options = options
        self.groups = {g.name: g for g in groups}
        self.group_of = {p: g.name for g in groups for p in g.params}
        self.clip_fn = CLIP_FNS[clip_fn]
        self.clip_fn_name = clip_fn
        self.gamma = gamma
        self.enabled = True
        #: How compiled code finds this clipper at run time (set by ``lightning_dp.compile``).
        self.id: int | None = None
        #: Set by ``lightning_dp.compile``: parameters several sites use (tied weights), whose
        #: compiled per-example norms need the sum over their uses.
        self.shared: frozenset[str] = frozenset()
        #: Parameters an eager backward saw used more than once (a module called twice):
        #: compiled graphs treat them as shared.
        self.repeated: set[str] = set()
        self._uses_per_param: dict[str, int] = defaultdict(int)
        #: Fixed-shape micro-batches: only the first ``real_rows`` examples are real, the rest is
        #: padding whose contribution must be exactly zero. None: every row is real.
        self.real_rows: int | None = None
        #: Under FSDP a unit's gradient is reduce-scattered as soon as its backward ends: a group
        #: still open at the end of the backward would be released unclipped or lost, so raise.
        self.require_prompt_finish = False
        self.stats: dict[str, GroupStats] = {}
        #: group -> indices of the sites (modules) whose parameters it holds
        self.group_sites: dict[str, set[int]] = defaultdict(set)
        #: Adaptive thresholds: keep each group's centred count sum_i (1[||g_ik|| <= C_k] - 1/2)
        #: summed over every backward until ``take_counts`` (one logical batch, any number of
        #: micro-batches). Non-finite norms count as outside C_k.
        self.count_within = False
        self._counts: dict[str, Tensor] = {}
        self._pending: dict[str, int] = defaultdict(int)
        #: Groups clipped so far in the running backward: a call announced into one of them
        #: (recomputed in the backward) would have its gradient clipped apart from the rest
        self._clipped: set[str] = set()
        #: Calls per site announced by forwards outside the backward, not yet recomputed in it
        self._announced: dict[int, int] = defaultdict(int)
        self._uses: dict[str, list[tuple[Site, GradUse]]] = defaultdict(list)
        #: Elements of the factors of calls clipped so far in this backward: backpropagation has
        #: released (or is about to release) them, so later layers' temporaries may use as much.
        self._released = 0
        self._callback_task: int | None = None
        #: Examples in the current forward. The strategies pin it to each micro-batch's size;
        #: otherwise ``make_private``'s hook reads it from the root model's inputs, or (when a
        #: submodule is called directly) the first private call of the forward sets it.
        self.examples: int | None = None
        self.examples_pinned = False
        #: The root model's forward set ``examples`` and has ended (``make_private``'s hooks):
        #: a later call whose rows differ starts a forward of its own
        self.root_forward_ended = False
        #: Run at the end of every backward (``make_private``'s check of the trainable
        #: parameters, for calls that bypassed the root model's forward); None where a strategy
        #: follows the trainable parameters itself.
        self.plan_check: Callable[[], None] | None = None
        #: Sites whose one-row input this forward expanded to the batch -> the input's shape,
        #: named in the note on an error the forward then raises (``make_private``).
        self.expanded: dict[str, tuple[int, ...]] = {}

    @contextlib.contextmanager
    def pinned_examples(self, count: int) -> Iterator[None]:
        """Every private call in this block belongs to a forward over ``count`` examples."""
        previous = self.examples_pinned
        self.forget_interrupted_backward()
        self.examples, self.examples_pinned = count, True
        try:
            yield
        finally:
            # ``examples`` stays set for recomputation in the backward (activation checkpointing)
            self.examples_pinned = previous

    def rows_are_examples(self, site: Site, rows: int, what: str, carries_grad: bool = False) -> bool:
        """Map a private call's rows to the forward's examples.

        A submodule called after the root's forward ended starts a forward of its own, unless
        its input ``carries_grad`` (computed by a forward still waiting for its backward): a
        head applied to the model's flattened hidden states ([B*T, d]) used to take B*T as the
        example count and clip every token as an example.

        ``rows`` equal to the example count: one row per example. One row while the forward holds
        several examples: a row every example shares (HF position ids of shape [1, T]), which
        the primitive expands so that each example's gradient through it is its own. Anything
        else (e.g. T5's [q, k] relative-position buckets) would have its batch-summed gradient
        clipped as if its rows were examples: refused.
        """
        continued = self.root_forward_ended and carries_grad
        if self.examples is None or (self._after_root_forward() and not carries_grad):
            self.examples, self.root_forward_ended = rows, False
        if rows == self.examples:
            return True
        if rows == 1:
            return False
        after = (" It was called after the model's forward, on a tensor computed from it (such as "
                 "a head on hidden states flattened to [B*T, d]), so its rows are that forward's "
                 "examples: keep them on dim 0 ([B, T, d]).") if continued else ""
        if not continued and rows % self.examples == 0:
            after = (f" Its rows are {rows // self.examples} times the examples: perhaps the model merged "
                     "the examples with another dimension (hidden states flattened to [B*T, d] as "
                     "OPT's MLP does, Swin's windows, a multiple-choice model's [B*C, T] inputs, a "
                     "mixture of experts' routed tokens), and which rows belong to which example "
                     "cannot be told there. Freeze this module, or train adapters (LoRA) on layers "
                     "whose inputs keep one row per example.")
        raise ExampleMismatchError(
            f"`{site.path}` ({type(site.module).__name__}) was called with an {what} whose "
            f"leading dimension has {rows} rows, but this forward holds {self.examples} examples.{after} "
            "lightning-dp attributes a private call's gradient to examples by that dimension (one "
            "row per example, or one row shared by all of them), so this call's gradient could "
            "not be clipped per example. An input every example shares, such as positions built "
            "with torch.arange(T), can be given one leading row of size 1 (pos.unsqueeze(0)), "
            "which is expanded to every example. Otherwise, if the input does not depend on the "
            f"example (e.g. relative-position buckets), freeze `{site.path}` with "
            "requires_grad_(False). If the "
            "model's examples are not along dim 0 of its first input, pass "
            "make_private(..., batch_size_fn=lambda args, kwargs: <number of examples>)."
        )

    def _after_root_forward(self) -> bool:
        """A call of a submodule after the root model's forward ended, outside any backward:
        the start of a forward of its own (the root's count is stale when that forward got no
        backward, e.g. a validation pass with gradients on), not a call of the root's."""
        return (self.root_forward_ended and not self.examples_pinned
                and torch._C._current_graph_task_id() == -1 and not torch.compiler.is_compiling())

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the model's plain forward (used to recompute inside the torch.func fallback)."""
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous

    def take_counts(self, device: torch.device) -> Tensor:
        """The centred counts of every group (in ``self.groups`` order) since the last call, then
        reset them. A group that saw no example counts 0. Float32: half-integers stay exact."""
        counts = torch.zeros(len(self.groups), dtype=torch.float32, device=device)
        for index, name in enumerate(self.groups):
            if name in self._counts:
                counts[index] = self._counts[name].to(device)
        self._counts.clear()
        return counts

    def on_forward(self, site: Site) -> None:
        if torch._C._current_graph_task_id() == -1:
            if self._callback_task is not None:  # left by a backward that raised
                self._reset_backward()
            self._announced[site.index] += 1
        else:  # recomputed inside the backward by an activation checkpoint
            # The backward running now is the outer one (a reentrant checkpoint runs its
            # segment's backward nested, after this): the end-of-backward callback belongs to
            # it, or it would fire after the first segment and clip a group spanning segments
            # in parts.
            self._queue_finish_callback()
            if self._announced[site.index] > 0:
                # non-reentrant: its forward counted this call already, and counting it twice
                # would hold its groups to the backward's end
                self._announced[site.index] -= 1
                return
            if not self._clipped.isdisjoint(site.groups):
                self._refuse_split(site)
        for group in site.groups:
            self._pending[group] += 1

    def _refuse_split(self, site: Site) -> None:
        split = sorted(self._clipped.intersection(site.groups))
        raise RuntimeError(
            f"lightning-dp: `{site.path}` ({type(site.module).__name__}) was called inside the "
            f"backward, after clipping groups {split} had been clipped without it. Calls inside a "
            "reentrant activation checkpoint (torch.utils.checkpoint(..., use_reentrant=True)) "
            "are counted only when they are recomputed, so a group whose other calls all come "
            "later in the forward is clipped in parts, each part to the full threshold. Use "
            "use_reentrant=False (HF: model.gradient_checkpointing_enable("
            "gradient_checkpointing_kwargs={'use_reentrant': False})), or per-layer clipping "
            "(clipping='layer')."
        )

    def on_backward(self, site: Site, use: GradUse) -> None:
        self._queue_finish_callback()
        canonical = [site.param_keys[use.names[role]] for role in use.params]
        for name in canonical:
            self._uses_per_param[name] += 1
        groups = site.groups
        if not self._clipped.isdisjoint(groups):
            self._refuse_late_use(site, use)
        if canonical and len(groups) == 1:
            group = groups[0]
            if self._pending[group] == 1 and group not in self._uses:
                del self._pending[group]
                self._clipped.add(group)
                self._clip_call(group, use)
                return
        touched = {self.group_of[name] for name in canonical}
        for group in site.groups:
            if group in touched:
                self._uses[group].append((site, use))
            remaining = self._pending[group] - 1
            if remaining == 0:
                self._finalize(group)
            elif remaining > 0 or group in touched:
                # below 0: calls the forward never announced (a second backward through a
                # retained graph), so how many will come is unknown: clipped at the end
                self._pending[group] = remaining

    def _refuse_late_use(self, site: Site, use: GradUse) -> None:
        """A gradient for a group this backward has already clipped: clipping it apart would
        give the group two clipped parts, each up to the threshold, so one example could move
        the sum by twice the bound. A primitive that hands over more gradients than its forward
        announced ends here, as does a reentrant checkpoint that :meth:`_refuse_split` missed."""
        touched = {self.group_of[site.param_keys[use.names[role]]] for role in use.params}
        late = sorted(self._clipped.intersection(touched))
        if not late:
            return
        raise RuntimeError(
            f"lightning-dp: `{site.path}` ({type(site.module).__name__}) handed over a gradient "
            f"for clipping groups {late} after they had been clipped in this backward. Clipped "
            "in two parts, each to the full threshold, the group's per-example gradient would "
            "not be bounded by it, so the gradient is refused. This is a bug in the rule for "
            f"{type(site.module).__name__} (each backward must report no more calls than its "
            "forward announced); please report it. Until then, pass fallback=True or freeze "
            f"`{site.path}`."
        )

    def on_unrequested_backward(self, site: Site) -> None:
        """A call's backward that wants no parameter gradient (gradients of inputs only): its
        parameters get none, as in plain PyTorch, and its forward's count is spent, so that a
        later backward's groups do not wait for it."""
        for group in site.groups:
            if self._pending.get(group, 0) > 0:
                self._pending[group] -= 1
                if self._pending[group] == 0 and group not in self._uses:
                    del self._pending[group]

    def _queue_finish_callback(self) -> None:
        """One end-of-backward callback per outermost backward: the inner backward that a
        reentrant activation checkpoint runs for its segment is part of the outer one (groups
        spanning the segment's boundary, such as tied embeddings, are still open there)."""
        if self._callback_task is None:
            self._callback_task = torch._C._current_graph_task_id()
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)

    def forget_interrupted_backward(self) -> None:
        """At a new forward, outside any backward: a backward that raised never ran its
        end-of-backward callback; drop its marker so that the next backward queues one, and
        what it left (the factors of groups it had not clipped, which the next backward would
        otherwise clip together with its own examples)."""
        if torch.compiler.is_compiling() or torch._C._current_graph_task_id() != -1:
            return
        if self._callback_task is not None:
            self._reset_backward()

    def _reset_backward(self) -> None:
        """Forget everything one backward (and the forwards it belongs to) counted and held."""
        self._uses.clear()
        self._pending.clear()
        self._clipped.clear()
        self._announced.clear()
        self._uses_per_param.clear()
        self._released = 0
        self._callback_task = None

    def _finish(self) -> None:
        """End of backward: finish groups some of whose calls got no gradient, then reset."""
        if self.require_prompt_finish and self._uses:
            late = sorted(self._uses)
            self._reset_backward()
            raise RuntimeError(
                f"lightning-dp: clipping groups {late} were still waiting for calls whose outputs "
                "got no gradient when the backward ended; under FSDP their units' gradients were "
                "already reduce-scattered. Make every private module's output reach the loss, or "
                "freeze the unused modules."
            )
        for group in list(self._uses):
            self._finalize(group)
        self.repeated.update(name for name, count in self._uses_per_param.items() if count > 1)
        self._reset_backward()
        if not self.examples_pinned:
            self.examples = None
        if self.plan_check is not None:
            self.plan_check()

    def _finalize(self, group_name: str) -> None:
        uses = self._uses.pop(group_name, [])
        self._pending.pop(group_name, None)
        self._clipped.add(group_name)
        if not uses:
            return
        batch_sizes = {use.batch_size for _, use in uses}
        if len(batch_sizes) != 1:
            paths = sorted({site.path for site, _ in uses})
            raise RuntimeError(
                f"Group {group_name!r} received per-example gradients for different batch sizes "
                f"{sorted(batch_sizes)} from modules {paths}. lightning-dp identifies examples by "
                "their index along the batch dimension, so every call of a private module in one "
                "backward must see the same batch; run one forward per backward."
            )
        # canonical param -> [(use, local name)]: a parameter reached by several calls (tied
        # weights, a module applied twice) has per-example gradient = the sum over its calls.
        contributions: dict[str, list[tuple[GradUse, str]]] = defaultdict(list)
        for site, use in uses:
            for role in use.params:
                canonical = site.param_keys[use.names[role]]
                if self.group_of[canonical] == group_name:
                    contributions[canonical].append((use, role))

        # in chunks when the whole batch's temporaries would be large next to the group's
        # factors plus what this backward has released
        sizes = _workspaces(contributions)
        if sizes is not None:
            temporary, held = sizes
            batch = uses[0][1].batch_size
            chunk = examples_per_chunk(batch, temporary, held, spare=self._released)
            self._released += held * batch
            if chunk < batch:
                self._clip_in_chunks(group_name, [calls[0] for calls in contributions.values()], chunk)
                return
        norms = []
        for calls in contributions.values():
            if len(calls) == 1:
                use, local = calls[0]
                norms.append(use.norm(local))
            else:
                norm_sqs, factors, counts = [], [], []
                for use, local in calls:
                    own, tensors = shared_use(use, local)
                    norm_sqs.append(own)
                    factors.extend(tensors)
                    counts.append(len(tensors))
                norms.append(norm_sq_of_sum(norm_sqs, factors, counts).sqrt())
        scale = self.scale_from_norms(group_name, group_norm(norms))
        for calls in contributions.values():
            for use, local in calls:
                _accumulate(use.params[local], use.clipped_grad(local, scale))

    def _clip_call(self, group_name: str, use: GradUse) -> None:
        """:meth:`_finalize` for the common case, a group that is all of one call's parameters
        (per-layer clipping of a module called once), without its book-keeping: this runs once
        per private module per step."""
        size = use.workspace()
        if size is not None:
            batch = use.batch_size
            chunk = examples_per_chunk(batch, size[0], size[1], spare=self._released)
            self._released += size[1] * batch
            if chunk < batch:
                self._clip_in_chunks(group_name, [(use, role) for role in use.params], chunk)
                return
        scale = self.scale_from_norms(group_name, group_norm([use.norm(role) for role in use.params]))
        for role, param in use.params.items():
            _accumulate(param, use.clipped_grad(role, scale))

    def _clip_in_chunks(self, group_name: str, calls: list[tuple[GradUse, str]], chunk: int) -> None:
        """Norm, clip and sum ``chunk`` examples at a time: each example's clip factor needs
        only its own norm, so the temporaries of one chunk are freed before the next. ``calls``:
        one (use, parameter role) per parameter of the group."""
        batch = calls[0][0].batch_size
        norms = []
        for start in range(0, batch, chunk):
            stop = min(start + chunk, batch)
            parts = {}
            for use, local in calls:
                if use not in parts:
                    parts[use] = use.example_rows(start, stop)
            norm = group_norm([parts[use].norm(local) for use, local in calls])
            scale = self._clip_factors(group_name, norm, start)
            for use, local in calls:
                _accumulate(use.params[local], parts[use].clipped_grad(local, scale))
            norms.append(norm)
        self._record(group_name, torch.cat(norms))

    def scale_from_norm_sq(self, group_name: str, norm_sq: Tensor) -> Tensor:
        """Per-example clip factors of a group from its squared norms; records its stats."""
        return self.scale_from_norms(group_name, norm_sq.sqrt())

    def scale_from_norms(self, group_name: str, norms: Tensor) -> Tensor:
        """Per-example clip factors of a group from its norms; records its stats.

        A non-finite norm, or a padding row, gets factor 0: that row adds exactly nothing.
        """
        scale = self._clip_factors(group_name, norms, 0)
        self._record(group_name, norms)
        return scale

    def _clip_factors(self, group_name: str, norms: Tensor, first_row: int) -> Tensor:
        """Clip factors of rows ``first_row, first_row + 1, ...`` of the batch."""
        factors = self.clip_fn(norms, self.groups[group_name].threshold, self.gamma)
        if self.real_rows is not None and first_row + norms.shape[0] > self.real_rows:
            factors[max(self.real_rows - first_row, 0) :] = 0.0
        return settle_factors_(factors)  # a NaN norm's factor made 0 (an inf one already is)

    def _record(self, group_name: str, norms: Tensor) -> None:
        """Keep the stats (and adaptive counts) of the real rows of a group's norms."""
        group = self.groups[group_name]
        real = norms.detach() if norms.requires_grad else norms  # each torch call counts here
        if self.real_rows is not None:
            real = real[: self.real_rows]
        self.stats[group_name] = GroupStats(norms=real, threshold=group.threshold)
        if self.count_within:  # centred bits of real rows; a non-finite norm counts as outside
            within = (real <= group.threshold).sum(dtype=torch.float32) - 0.5 * real.numel()
            self._counts[group_name] = self._counts.get(group_name, 0.0) + within.detach()

    def deferred_grads(self, site: Site, use: GradUse) -> dict[str, Tensor]:
        """Compiled mode: this call's clipped gradients, the group factors left to the graph pass.

        Each group this call touches gets one ``group_scale`` node over the call's share of the
        group's squared norms, naming the parameters it covers; ``lightning_dp.passes`` joins the
        nodes of a group into one (a module's calls may share a group but not a parameter). A
        shared parameter's use gets a ``shared_scale`` node carrying its own norm and its factors,
        from which the pass computes the norm of the sum over the parameter's uses.
        """
        by_group: dict[str, list[str]] = defaultdict(list)
        for role in use.params:
            by_group[self.group_of[site.param_keys[use.names[role]]]].append(role)
        grads = {}
        for group_name, names in by_group.items():
            keys = {name: site.param_keys[use.names[name]] for name in names}
            own = [name for name in names if keys[name] not in self.shared]
            scales = {}
            if own:
                norm_sq = use.norm_sq(own[0])
                for name in own[1:]:
                    norm_sq = norm_sq + use.norm_sq(name)
                params = ",".join(sorted(keys[name] for name in own))
                scale = group_scale(norm_sq, self.id, group_name, site.index, params)
                scales = dict.fromkeys(own, scale)
            for name in names:
                if name not in scales:
                    norm_sq, factors = shared_use(use, name)
                    scales[name] = shared_scale(norm_sq, factors, self.id, group_name, site.index, keys[name])
            # each node feeds a gradient (unused ones would be dropped before the pass); the pass
            # replaces all of the group's nodes by one
            for name in names:
                grads[name] = use.clipped_grad(name, scales[name]).to(use.params[name].dtype)
        return grads


def _workspaces(contributions: dict[str, list[tuple[GradUse, str]]]) -> tuple[int, int] | None:
    """(temporary, held) elements per example of a group's calls together
    (``GradUse.workspace``); None when some call cannot be split or some parameter has several
    calls (a shared one needs every use's factors at once). Loops, not generators: this runs
    once per group per backward."""
    temporary = held = 0
    seen = set()
    for calls in contributions.values():
        if len(calls) != 1:
            return None
        use = calls[0][0]
        if use in seen:
            continue
        seen.add(use)
        size = use.workspace()
        if size is None:
            return None
        temporary += size[0]
        held += size[1]
    return temporary, held


def group_norm(norms: list[Tensor]) -> Tensor:
    """Per-example norm of a group's gradient from its parameters' per-example norms, in one
    op for two parameters (a weight and its bias) or any number."""
    if len(norms) == 1:
        return norms[0]
    if len(norms) == 2:
        return torch.hypot(*norms)
    return torch.linalg.vector_norm(torch.stack(norms), dim=0)


def shared_use(use: GradUse, name: str) -> tuple[Tensor, list[Tensor]]:
    """One use of a shared parameter: its own squared norms, and its token factors (rows, cols)
    or, where the primitive has none, its instantiated per-example gradient."""
    factors = use.token_factors(name)
    if factors is None:
        per_example = upcast(use.per_example(name))
        return row_norm_sq(per_example), [per_example]
    return use.norm_sq(name), [factors.rows, factors.cols]


def _accumulate(param: Tensor, grad: Tensor) -> None:
    grad = in_dtype(grad, param.dtype)
    if param.grad is None:
        param.grad = grad
    else:
        param.grad.add_(grad)
