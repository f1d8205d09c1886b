"""Trust, then verify: the engine's per-example norms against single-example backward passes.

Every rule and routing decision rests on assumptions about the model (which rows are examples,
what a module's forward computes) and about the loss (that example i's loss depends on example
i alone). A mismatch in any of them shows up as a per-example group norm that differs from the
norm of the gradient of that example's loss taken alone. ``self_check`` compares the two for a
few examples of a real batch, dropout off in both, before a single noisy step is released. The
examples checked are spread over the batch (its first, its last, evenly between): a loss that
mixes examples can look right for the first few (the hardest ones of a batch that trains only on
its hardest, in a loader sorted by difficulty).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.utils._pytree import tree_flatten, tree_map

from lightning_dp.data.microbatch import pad_batch
from lightning_dp.engine.make_private import PrivacyLeakError, _state

LossFn = Callable[[nn.Module, Any], Tensor]


class SelfCheckError(PrivacyLeakError):
    """The engine's per-example norms disagree with single-example backward passes."""


@dataclass
class SelfCheckReport:
    """Per group: the engine's norms and the single-example reference norms, examples checked."""

    engine: dict[str, list[float]]
    reference: dict[str, list[float]]
    examples: int
    #: their rows in the batch
    rows: list[int]


def self_check(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    num_examples: int = 3,
    rtol: float = 1e-3,
) -> SelfCheckReport:
    """Compare the per-example group norms of ``model`` (made private) on ``batch`` with the
    norms of single-example gradients of the same loss; raise :class:`SelfCheckError` naming the
    groups that disagree.

    Args:
        model: a model rewritten by ``make_private``.
        loss_fn: ``loss_fn(model, batch)``: per-example losses of shape [B], or their sum.
        batch: a batch whose tensors hold examples along dim 0 (others are passed whole).
        num_examples: how many of the batch's examples to check, spread over it (all are in
            the engine pass, so a loss that mixes examples shows).
        rtol: relative tolerance on each norm (raise it under bf16/fp16).

    Gradients already in ``.grad``, adaptive-threshold counts and module training flags are
    left as they were. The model runs in eval mode for both passes (dropout off).
    """
    state = _state(model)
    clipper = state.clipper
    size = _batch_size(batch)
    rows = checked_rows(size, num_examples)
    params = dict(model.named_parameters())
    with _quiet(model, state):
        engine = _engine_norms(model, clipper, loss_fn, batch, size, rows)
        reference: dict[str, list[float]] = {g: [] for g in clipper.groups}
        with clipper.disabled():
            for i in rows:
                loss = _summed(loss_fn(model, _rows(batch, i, i + 1, size)))
                # a parameter the loss function froze (inside training_step) gets no gradient,
                # in the engine's pass too
                names = [n for g in clipper.groups.values() for n in g.params if params[n].requires_grad]
                grads = dict(zip(names, torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)))
                for name, group in clipper.groups.items():
                    total = sum(float(grads[n].double().pow(2).sum()) for n in group.params if grads.get(n) is not None)
                    reference[name].append(math.sqrt(total))
    _compare(engine, reference, rtol, rows)
    return SelfCheckReport(engine, reference, len(rows), rows)


def self_check_across_ranks(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    group: dist.ProcessGroup | None = None,
    num_examples: int = 3,
    rtol: float = 1e-3,
) -> SelfCheckReport | None:
    """:func:`self_check` for a model sharded over the ranks of ``group`` (FSDP2): a collective
    that every rank calls with its own micro-batch, possibly empty.

    The first rank holding examples checks a few of them. Gradients are reduce-scattered inside
    each backward, so a single-example reference pass runs on every rank at once: that rank's
    example unclipped, every other rank one row clipped to exactly zero; the sharded gradients
    then hold that one example's gradient, and each group's norm is summed from the shards over
    the ranks. Every rank gets the same report, or raises the same :class:`SelfCheckError`.
    Returns None (nothing checked) when no rank holds an example.
    """
    state = _state(model)
    clipper = state.clipper
    size = _batch_size(batch)
    sizes = torch.zeros(dist.get_world_size(group), dtype=torch.long)
    sizes[dist.get_rank(group)] = size
    dist.all_reduce(sizes, group=group)
    holders = sizes.nonzero().flatten().tolist()
    if not holders:
        return None
    checks_here = dist.get_rank(group) == holders[0]
    rows = checked_rows(int(sizes[holders[0]]), num_examples)
    checked = len(rows)
    names = list(clipper.groups)
    params = dict(model.named_parameters())
    # A rank that only joins the collectives runs one row it holds, or one padding row (models
    # such as HF's cannot run zero rows), clipped to exactly zero.
    stand_in = _rows(batch, 0, 1, size) if size else pad_batch(batch, 1)[0]
    with _quiet(model, state):
        if size:
            mine = _engine_norms(model, clipper, loss_fn, batch, size, rows if checks_here else [])
        else:
            with _clipped_to_zero(clipper):
                _engine_norms(model, clipper, loss_fn, stand_in, 1, [])
            mine = {}
        engine = torch.tensor(
            [mine.get(g, [0.0] * checked) if checks_here else [0.0] * checked for g in names], dtype=torch.float64
        ).reshape(len(names), checked)
        dist.all_reduce(engine, group=group)  # only the checking rank's rows are non-zero
        squares = torch.zeros(len(names), checked, dtype=torch.float64)
        for k, i in enumerate(rows):
            for p in model.parameters():
                p.grad = None
            if checks_here:
                with clipper.disabled():
                    _summed(loss_fn(model, _rows(batch, i, i + 1, size))).backward()
            else:
                with _clipped_to_zero(clipper), clipper.pinned_examples(1):
                    _summed(loss_fn(model, stand_in)).backward()
            for index, name in enumerate(names):
                squares[index, k] = sum(_local_square_sum(params[n].grad) for n in clipper.groups[name].params)
        dist.all_reduce(squares, group=group)
    engine_norms = {g: engine[k].tolist() for k, g in enumerate(names)}
    reference = {g: squares[k].sqrt().tolist() for k, g in enumerate(names)}
    _compare(engine_norms, reference, rtol, rows)
    return SelfCheckReport(engine_norms, reference, checked, rows)


def checked_rows(size: int, count: int) -> list[int]:
    """``count`` rows of a batch of ``size`` spread over it: the first, the last, evenly between."""
    if count >= size:
        return list(range(size))
    if count <= 1:
        return [0][:count]
    return sorted({round(k * (size - 1) / (count - 1)) for k in range(count)})


def _engine_norms(model: nn.Module, clipper: Any, loss_fn: LossFn, batch: Any, size: int, rows: list[int]) -> dict[str, list[float]]:
    """The engine's per-example group norms of examples ``rows``, whole batch in."""
    with clipper.pinned_examples(size):
        _summed(loss_fn(model, batch)).backward()
    engine = {g: s.norms[rows].double().tolist() for g, s in clipper.stats.items()}
    for p in model.parameters():
        p.grad = None
    return engine


@contextlib.contextmanager
def _clipped_to_zero(clipper: Any) -> Iterator[None]:
    """Every row of the passes in this block is padding: its clipped gradient is exactly 0."""
    previous, clipper.real_rows = clipper.real_rows, 0
    try:
        yield
    finally:
        clipper.real_rows = previous


def _local_square_sum(grad: Tensor | None) -> float:
    """This rank's part of ||grad||^2: its shard of a sharded gradient."""
    if grad is None:
        return 0.0
    local = grad.to_local() if isinstance(grad, DTensor) else grad
    return float(local.double().pow(2).sum())


def _compare(engine: dict[str, list[float]], reference: dict[str, list[float]], rtol: float, rows: list[int]) -> None:
    scale = max([abs(v) for values in reference.values() for v in values if math.isfinite(v)] or [1.0])
    atol = 1e-6 * scale
    wrong = []
    for group, ref in reference.items():
        got = engine.get(group, [0.0] * len(ref))  # a group the batch never reached: norm 0
        for i, a, b in zip(rows, got, ref):
            if not (math.isfinite(a) and math.isfinite(b)):
                continue  # a non-finite example is zeroed by the clipper, not compared
            if abs(a - b) > rtol * max(abs(a), abs(b)) + atol:
                wrong.append(f"  {group!r}, example {i}: engine {a:.6g}, single-example pass {b:.6g}")
    if wrong:
        shown = "\n".join(wrong[:12]) + (f"\n  ... and {len(wrong) - 12} more" if len(wrong) > 12 else "")
        raise SelfCheckError(
            "lightning-dp self-check: the per-example gradient norms the engine computed differ "
            "from backward passes of each example alone, so clipping would not bound each "
            f"example's influence:\n{shown}\nLikely causes: the loss mixes examples (a mean over "
            "the tokens of the whole batch, class weights, a masked mean: return per-example "
            "losses, e.g. lightning_dp.losses.sequence_cross_entropy), or a module in these "
            "groups reads inputs whose rows are not examples. Nothing was released. If you are "
            "sure the difference is numerical, raise the tolerance or turn the check off "
            "(self_check=False)."
        )


def _summed(loss: Tensor) -> Tensor:
    return loss.sum() if loss.dim() > 0 else loss


def _batch_size(batch: Any) -> int:
    for leaf in tree_flatten(batch)[0]:
        if isinstance(leaf, Tensor) and leaf.dim() > 0:
            return leaf.shape[0]
    raise ValueError("self_check: the batch holds no tensor with a batch dimension.")


def _rows(batch: Any, start: int, stop: int, size: int) -> Any:
    """Examples ``start:stop`` of every tensor that holds the batch's examples along dim 0."""
    return tree_map(
        lambda t: t[start:stop] if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == size else t,
        batch,
    )


@contextlib.contextmanager
def _quiet(model: nn.Module, state: Any) -> Iterator[None]:
    """Eval mode, and gradients, counts and stats as they were afterwards."""
    modes = {m: m.training for m in model.modules()}
    grads = {p: p.grad for p in model.parameters()}
    clipper = state.clipper
    counts, stats = dict(clipper._counts), dict(clipper.stats)
    for p in grads:
        p.grad = None
    model.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training
        for p, grad in grads.items():
            p.grad = grad
        clipper._counts, clipper.stats = counts, stats
