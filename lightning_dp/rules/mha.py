"""``nn.MultiheadAttention`` through its two projections as linear primitives.

The input projection is one linear call over ``in_proj_weight``: for self-attention on the
input itself; for cross-attention on the query, key and value tokens concatenated along the
sequence, of whose output each takes its own block (the other blocks get zero gradient, so the
per-example gradient is still that of the three projections). Attention itself has no
parameters; the output projection is a linear call over ``out_proj``'s parameters, which
``nn.MultiheadAttention`` uses functionally. So the module compiles, with ghost norms or
instantiation chosen per projection like any linear layer.

Configurations with other parameters or layouts (``add_bias_kv``, ``add_zero_attn``, ``kdim``
or ``vdim`` other than ``embed_dim``) keep the torch.func fallback over the whole module.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_dp.rules.base import CallSite, Rule
from lightning_dp.rules.func_fallback import FuncFallbackRule
from lightning_dp.rules.linear import linear
from lightning_dp.rules.registry import rules

_IN_PROJ = {"weight": "in_proj_weight", "bias": "in_proj_bias"}
_OUT_PROJ = {"weight": "out_proj.weight", "bias": "out_proj.bias"}


def projections_suffice(module: nn.MultiheadAttention) -> bool:
    """True when every parameter is one of the two projections' (no key/value bias rows)."""
    return module._qkv_same_embed_dim and module.bias_k is None and not module.add_zero_attn


@rules.register(nn.MultiheadAttention)
class MultiheadAttentionRule(Rule):
    covers_subtree = True

    def __init__(self) -> None:
        self.fallback = FuncFallbackRule(covers_subtree=True)

    def compilable(self, module: nn.Module) -> bool:
        return projections_suffice(module)

    def validate(self, module: nn.MultiheadAttention, path: str) -> None:
        if not module.batch_first:
            raise ValueError(
                f"`{path}` is an nn.MultiheadAttention with batch_first=False; lightning-dp needs "
                "the batch dimension first to tell examples apart. Construct it with "
                "batch_first=True and pass [batch, seq, embed] inputs."
            )

    def forward(
        self,
        site: CallSite,
        module: nn.MultiheadAttention,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        if not projections_suffice(module):
            return self.fallback.forward(
                site, module, query, key, value, key_padding_mask=key_padding_mask,
                need_weights=need_weights, attn_mask=attn_mask,
                average_attn_weights=average_attn_weights, is_causal=is_causal,
            )
        if query.dim() != 3:
            raise ValueError(
                f"`{site.path}` (nn.MultiheadAttention) got a query of shape {tuple(query.shape)}; "
                "lightning-dp needs batched [batch, seq, embed] inputs to tell examples apart."
            )
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint.")
        q, k, v = _in_projection(site, module, query, key, value)
        batch, heads = q.shape[0], module.num_heads
        # reshape, not unflatten: under a parent module's routing mode dynamo cannot trace
        # Tensor.unflatten (a Python method calling super()) when compiling
        q, k, v = (t.reshape(*t.shape[:2], heads, module.head_dim).transpose(1, 2) for t in (q, k, v))
        mask = _additive_mask(attn_mask, key_padding_mask, q, batch, heads, k.shape[2])
        dropout = module.dropout if module.training else 0.0
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(module.head_dim)
            weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            if dropout > 0:
                weights = F.dropout(weights, dropout)
            out = weights @ v
        else:
            weights = None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        out = out.transpose(1, 2).flatten(2)
        out = linear(site, out, module.out_proj.weight, module.out_proj.bias, names=_OUT_PROJ)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        return out, weights


def _in_projection(
    site: CallSite, module: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v from one linear call over ``in_proj_weight`` (one use of the parameter)."""
    weight, bias = module.in_proj_weight, module.in_proj_bias
    if query is key and key is value:
        return linear(site, query, weight, bias, names=_IN_PROJ).chunk(3, dim=-1)
    sources = [query, key] if key is value else [query, key, value]
    projected = linear(site, torch.cat(sources, dim=1), weight, bias, names=_IN_PROJ)
    blocks = projected.split([t.shape[1] for t in sources], dim=1)
    q = blocks[0].chunk(3, dim=-1)[0]
    if key is value:
        _, k, v = blocks[1].chunk(3, dim=-1)
    else:
        k, v = blocks[1].chunk(3, dim=-1)[1], blocks[2].chunk(3, dim=-1)[2]
    return q, k, v


def _additive_mask(
    attn_mask: Tensor | None, key_padding_mask: Tensor | None, like: Tensor, batch: int,
    heads: int, keys: int,
) -> Tensor | None:
    """Both masks as one float mask broadcastable to [B, H, T, S] (True in a boolean mask:
    not attended, as ``nn.MultiheadAttention`` reads it)."""
    mask = None
    if attn_mask is not None:
        mask = _as_float(attn_mask, like)
        if mask.dim() == 3:  # [B * H, T, S]
            mask = mask.view(batch, heads, *mask.shape[1:])
    if key_padding_mask is not None:
        padding = _as_float(key_padding_mask, like).view(batch, 1, 1, keys)
        mask = padding if mask is None else mask + padding
    return mask


def _as_float(mask: Tensor, like: Tensor) -> Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=like.dtype, device=like.device).masked_fill(mask, float("-inf"))
    return mask.to(like.dtype)

