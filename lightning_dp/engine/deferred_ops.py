"""Custom ops that let a compiled backward clip per group without Python book-keeping.

Under ``lightning_dp.compile`` every DP primitive's backward computes its per-example squared
norms, asks ``group_scale`` for the group's clip factors, and returns its clipped parameter
gradient to autograd. ``group_scale`` stands for "the clip factors of this group once *every*
member's norm is known": it cannot be computed from one member alone, so its kernel refuses to
run. The graph pass (``lightning_dp.passes``) replaces all ``group_scale`` nodes of one group by
one ``clip_scale`` over all members' norms, placed after the last of them, so the compiled
backward finishes flat and group clipping in one pass. A graph that skipped the pass fails
loudly instead of clipping each layer on its own (which would break the sensitivity bound).

A parameter used more than once per forward (a tied embedding and LM head) has as per-example
gradient the sum over its uses, whose norm has cross terms no single use can see. Each use hands
its own norm and its factors (token factors, or its instantiated per-example gradient) to
``shared_scale`` instead; the pass joins a parameter's uses in one ``shared_norm_sq``
(``engine.shared_norms``) and adds the result to the group's norms.
"""

from __future__ import annotations

import weakref
from typing import Protocol

import torch
from torch import Tensor

from lightning_dp.engine.shared_norms import norm_sq_of_sum


class _ScaleSource(Protocol):
    """What compiled code needs of a clipper (``engine.clipper.Clipper``)."""

    def scale_from_norm_sq(self, group_name: str, norm_sq: Tensor) -> Tensor: ...


_CLIPPERS: weakref.WeakValueDictionary[int, _ScaleSource] = weakref.WeakValueDictionary()
_NEXT_ID = [0]


def register_clipper(clipper: _ScaleSource) -> int:
    """A process-unique id by which compiled code finds the clipper at run time."""
    _NEXT_ID[0] += 1
    _CLIPPERS[_NEXT_ID[0]] = clipper
    return _NEXT_ID[0]


def clipper_by_id(clipper_id: int) -> _ScaleSource:
    clipper = _CLIPPERS.get(clipper_id)
    if clipper is None:
        raise RuntimeError(
            f"lightning-dp: compiled code refers to clipper {clipper_id}, which no longer exists; "
            "compile the private model again with lightning_dp.compile."
        )
    return clipper


@torch.library.custom_op("lightning_dp::group_scale", mutates_args=())
def group_scale(norm_sq: Tensor, clipper: int, group: str, site: int, params: str) -> Tensor:
    raise RuntimeError(
        f"lightning-dp: clipping group {group!r} reached run time without the lightning_dp graph "
        "pass that joins its members' norms: it was compiled without lightning_dp.compile, by a "
        "backend other than inductor, or dynamo fell back to eager for one of its layers (a "
        "graph break; compile with fullgraph=True to see where). Compile private models with "
        "lightning_dp.compile(model)."
    )


@group_scale.register_fake
def _(norm_sq: Tensor, clipper: int, group: str, site: int, params: str) -> Tensor:
    return torch.empty_like(norm_sq)


@torch.library.custom_op("lightning_dp::shared_scale", mutates_args=())
def shared_scale(
    norm_sq: Tensor, factors: list[Tensor], clipper: int, group: str, site: int, param: str
) -> Tensor:
    """As ``group_scale`` for one use of a shared parameter, carrying the use's factors."""
    return group_scale(norm_sq, clipper, group, site, param)


@shared_scale.register_fake
def _(norm_sq: Tensor, factors: list[Tensor], clipper: int, group: str, site: int, param: str) -> Tensor:
    return torch.empty_like(norm_sq)


@torch.library.custom_op("lightning_dp::shared_norm_sq", mutates_args=())
def shared_norm_sq(norm_sqs: list[Tensor], factors: list[Tensor], counts: list[int]) -> Tensor:
    """Per-example squared norm of a shared parameter's gradient: of the sum of its uses."""
    return norm_sq_of_sum(norm_sqs, factors, counts)


@shared_norm_sq.register_fake
def _(norm_sqs: list[Tensor], factors: list[Tensor], counts: list[int]) -> Tensor:
    return torch.empty_like(norm_sqs[0])


@torch.library.custom_op("lightning_dp::clip_scale", mutates_args=())
def clip_scale(norm_sqs: list[Tensor], clipper: int, group: str) -> Tensor:
    """The clip factors of ``group`` from all its members' per-example squared norms.

    Reads the group's threshold and clip function at run time (so thresholds may change between
    steps without recompiling) and records the group's statistics for logging.
    """
    total = norm_sqs[0]
    for term in norm_sqs[1:]:
        total = total + term
    return clipper_by_id(clipper).scale_from_norm_sq(group, total)


@clip_scale.register_fake
def _(norm_sqs: list[Tensor], clipper: int, group: str) -> Tensor:
    return torch.empty_like(norm_sqs[0])
