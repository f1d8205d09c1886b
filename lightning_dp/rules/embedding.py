"""``nn.Embedding``: per-example norms from the gradient rows summed per distinct token.

Example i's gradient has one row per distinct token id it contains, the sum of the output
gradients at that id's positions: ``||G_i||^2 = sum_{t,t'} [id_t = id_t'] <g_t, g_t'>``. Summing
rows per (example, id) pair costs B*T*d time and memory, never B*V*d. Compiled graphs need
shapes that do not depend on the data, so there the pairwise form above is used instead
(B*T^2*d, no ``unique`` and no boolean indexing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_dp.rules.base import (
    CallSite,
    GradUse,
    Rule,
    TokenFactors,
    row_dot_,
    row_norm,
    row_norm_sq,
    scale_rows,
    upcast,
    weighted_sum,
)
from lightning_dp.rules.registry import rules


def embedding_use(ids: Tensor, g: Tensor, weight: Tensor, padding_idx: int | None) -> GradUse:
    """The rows-per-token form eagerly (without summing when every example has the same ids,
    each once); the fixed-shape pairwise form inside compiled graphs."""
    if torch.compiler.is_compiling():
        return PairwiseEmbeddingUse(ids, g, weight, padding_idx)
    if _one_shared_row_of_distinct_ids(ids, padding_idx):
        return SharedRowEmbeddingUse(ids, g, weight)
    return EmbeddingUse(ids, g, weight, padding_idx)


def _one_shared_row_of_distinct_ids(ids: Tensor, padding_idx: int | None) -> bool:
    """True for ids that are one row repeated for every example, holding no id twice and no
    padding: HF position ids of shape [1, T] (expanded by ``CallSite.enter``), or positions
    built as ``arange(T).expand(B, T)`` and copied. Each example's gradient rows are then its own
    output-gradient rows, with nothing to sum per token. Token ids fail the first test: one
    comparison of a few thousand integers, next to the sort the general form runs."""
    if ids.dim() != 2 or ids.shape[0] < 2:
        return False
    if ids.stride(0) != 0 and not torch.equal(ids, ids[:1].expand_as(ids)):
        return False
    row = ids[0]
    if padding_idx is not None and bool((row == padding_idx).any()):
        return False
    return torch.unique(row).numel() == row.numel()


def _tokens(ids: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """ids [B, T] and output gradients [B, T, d] (T = 1 for one id per example)."""
    ids = ids.flatten(1) if ids.dim() > 1 else ids.unsqueeze(1)
    return ids, g.reshape(*ids.shape, g.shape[-1])


class EmbeddingUse(GradUse):
    def __init__(self, ids: Tensor, g: Tensor, weight: Tensor, padding_idx: int | None) -> None:
        batch = ids.shape[0]
        super().__init__({"weight": weight}, batch)
        self.num_embeddings = weight.shape[0]
        ids, g = _tokens(ids, g)
        example = torch.arange(batch, device=ids.device).unsqueeze(1).expand_as(ids)
        keep = None if padding_idx is None else ids != padding_idx
        if keep is None:  # every token: views, not boolean-indexed copies
            self.example, self.ids, self.g = example.reshape(-1), ids.reshape(-1), g.reshape(-1, g.shape[-1])
        else:
            self.example, self.ids, self.g = example[keep], ids[keep], g[keep]
        # row r of self.g (one token kept) belongs to example self.example[r]
        self._by_example = (ids, g, keep)  # for token_factors

    def token_factors(self, name: str) -> TokenFactors:
        ids, g, keep = self._by_example
        g = upcast(g)
        return TokenFactors(rows=ids, cols=g if keep is None else g * keep.unsqueeze(-1).to(g.dtype))

    def norm_sq(self, name: str) -> Tensor:
        key = self.example * self.num_embeddings + self.ids
        unique, inverse = torch.unique(key, return_inverse=True)
        rows = self.g.new_zeros((unique.numel(), self.g.shape[1]), dtype=upcast(self.g).dtype)
        rows.index_add_(0, inverse, upcast(self.g))
        norm_sq = rows.new_zeros(self.batch_size)
        return norm_sq.index_add_(0, unique // self.num_embeddings, row_norm_sq(rows))

    def per_example(self, name: str) -> Tensor:
        grads = self.g.new_zeros((self.batch_size, self.num_embeddings, self.g.shape[1]))
        return grads.index_put_((self.example, self.ids), self.g, accumulate=True)

    def clipped_grad(self, name: str, scale: Tensor) -> Tensor:
        rows = scale_rows(scale[self.example], self.g)
        grad = rows.new_zeros((self.num_embeddings, self.g.shape[1]))
        return grad.index_add_(0, self.ids, rows)


class SharedRowEmbeddingUse(GradUse):
    """Ids [B, T] that are one row of distinct ids for every example: example i's gradient is
    ``g_i`` placed at rows ``row``, so its norm is ``||g_i||`` and the clipped sum is
    ``sum_i c_i g_i`` placed once, with no sort, no per-token sums, and no B*T-row scatter."""

    def __init__(self, ids: Tensor, g: Tensor, weight: Tensor) -> None:
        super().__init__({"weight": weight}, ids.shape[0])
        self.num_embeddings = weight.shape[0]
        self.ids, self.g = _tokens(ids, g)  # [B, T], [B, T, d]
        self.row = self.ids[0]

    def norm_sq(self, name: str) -> Tensor:
        return self.norm(name).square()

    def norm(self, name: str) -> Tensor:
        return row_norm(self.g)

    def token_factors(self, name: str) -> TokenFactors:
        return TokenFactors(rows=self.ids, cols=upcast(self.g))

    def per_example(self, name: str) -> Tensor:
        grads = self.g.new_zeros((self.batch_size, self.num_embeddings, self.g.shape[2]))
        return grads.index_copy_(1, self.row, self.g)

    def clipped_grad(self, name: str, scale: Tensor) -> Tensor:
        grad = self.g.new_zeros((self.num_embeddings, self.g.shape[2]))
        return grad.index_copy_(0, self.row, weighted_sum(scale, self.g))


class PairwiseEmbeddingUse(GradUse):
    """Fixed shapes: padding tokens get zero gradient rows instead of being dropped."""

    def __init__(self, ids: Tensor, g: Tensor, weight: Tensor, padding_idx: int | None) -> None:
        super().__init__({"weight": weight}, ids.shape[0])
        self.num_embeddings = weight.shape[0]
        self.ids, g = _tokens(ids, g)
        if padding_idx is not None:
            g = g * (self.ids != padding_idx).unsqueeze(-1).to(g.dtype)
        self.g = g  # [B, T, d]

    def norm_sq(self, name: str) -> Tensor:
        g = upcast(self.g)
        same = (self.ids.unsqueeze(2) == self.ids.unsqueeze(1)).to(g.dtype)  # [B, T, T]
        return row_dot_(same, torch.bmm(g, g.transpose(1, 2))).clamp_(min=0)  # see linear.ghost_norm_sq

    def token_factors(self, name: str) -> TokenFactors:
        return TokenFactors(rows=self.ids, cols=upcast(self.g))

    def per_example(self, name: str) -> Tensor:
        grads = self.g.new_zeros((self.batch_size, self.num_embeddings, self.g.shape[2]))
        return grads.scatter_add_(1, self.ids.unsqueeze(-1).expand_as(self.g), self.g)

    def clipped_grad(self, name: str, scale: Tensor) -> Tensor:
        rows = scale_rows(scale, self.g).flatten(0, 1)
        grad = rows.new_zeros((self.num_embeddings, rows.shape[1]))
        return grad.index_add_(0, self.ids.flatten(), rows)


class _EmbeddingFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, site, options: EmbeddingOptions, names, ids: Tensor, weight: Tensor):
        ctx.site, ctx.weight, ctx.padding_idx, ctx.names = site, weight, options.padding_idx, names
        ctx.save_for_backward(ids)
        return F.embedding(
            ids, weight, options.padding_idx, options.max_norm, options.norm_type, False, False
        )

    @staticmethod
    def backward(ctx, g: Tensor):
        (ids,) = ctx.saved_tensors
        use = embedding_use(ids, g, ctx.weight, ctx.padding_idx)
        use.names.update(ctx.names or {})
        grads = ctx.site.record(use) or {}
        return None, None, None, None, grads.get("weight")


@dataclass(frozen=True)
class EmbeddingOptions:
    padding_idx: int | None = None
    max_norm: float | None = None
    norm_type: float = 2.0
    scale_grad_by_freq: bool = False
    sparse: bool = False

    def check(self, path: str) -> None:
        """Refuse the options that mix examples or cannot be clipped densely."""
        if self.scale_grad_by_freq:
            raise ValueError(
                f"`{path}` looks up an embedding with scale_grad_by_freq=True, which scales each "
                "example's gradient by token counts over the whole batch and so mixes examples; "
                "set scale_grad_by_freq=False."
            )
        if self.sparse:
            raise ValueError(
                f"`{path}` looks up an embedding with sparse=True; lightning-dp writes dense "
                "clipped gradients (noise makes every row dense anyway). Set sparse=False."
            )


def embedding(
    site: CallSite,
    ids: Tensor,
    weight: Tensor,
    options: EmbeddingOptions = EmbeddingOptions(),
    names: dict[str, str] | None = None,
) -> Tensor:
    """``F.embedding`` whose weight gradient goes to ``site``'s clipper, clipped per example."""
    options.check(site.path)
    return _EmbeddingFn.apply(site, options, names, site.enter(ids), weight)


@rules.register(nn.Embedding)
class EmbeddingRule(Rule):
    handles = ("weight", "bias")

    def validate(self, module: nn.Embedding, path: str) -> None:
        _options(module).check(path)

    def forward(self, site, module: nn.Embedding, ids: Tensor) -> Tensor:
        return embedding(site, ids, module.weight, _options(module))


def _options(module: nn.Embedding) -> EmbeddingOptions:
    return EmbeddingOptions(
        module.padding_idx, module.max_norm, module.norm_type, module.scale_grad_by_freq,
        module.sparse,
    )
