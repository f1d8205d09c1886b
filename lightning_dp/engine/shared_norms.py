"""Per-example squared norms of a parameter used several times in one forward (a tied embedding
and LM head, a layer applied twice): the norm of the *sum* of its uses' gradients.

``||sum_k G_k||^2 = sum_k ||G_k||^2 + 2 sum_{k<l} <G_k, G_l>``. When every use comes as token
factors (linear and embedding weights, ``rules.protocol.TokenFactors``) each cross term is a
product of two Gram matrices over token pairs, B*T*T' work; otherwise, or when that costs more,
the uses are instantiated ([B, *shape] each) and summed. The eager clipper and the compiled
graph's ``shared_norm_sq`` op both compute it here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_dp.rules.protocol import row_dot_, row_norm_sq


def norm_sq_of_sum(norm_sqs: list[Tensor], factors: list[Tensor], counts: list[int]) -> Tensor:
    """Squared norm per example of the sum of a parameter's uses.

    ``norm_sqs[k]`` is use k's own squared norm; ``factors`` holds each use's tensors in turn,
    ``counts[k]`` of them: 2 for token factors (rows, cols), 1 for an instantiated per-example
    gradient.
    """
    uses, start = [], 0
    for count in counts:
        uses.append(factors[start : start + count])
        start += count
    if all(len(use) == 2 for use in uses) and _cross_terms_are_cheaper(uses):
        total = norm_sqs[0]
        for other in norm_sqs[1:]:
            total = total + other
        for k in range(len(uses)):
            for l in range(k + 1, len(uses)):
                total = total + 2 * _cross(*uses[k], *uses[l])
        return total.clamp(min=0)  # rounding may take a near-cancelling sum below 0
    shape = _parameter_shape(uses)
    summed = _instantiate(uses[0], shape)
    for use in uses[1:]:
        summed = summed + _instantiate(use, shape)
    return row_norm_sq(summed)


def _cross(rows_a: Tensor, cols_a: Tensor, rows_b: Tensor, cols_b: Tensor) -> Tensor:
    """``<G_a, G_b>`` per example from token factors: sum over token pairs (t, s) of
    ``<r_t, r'_s> <c_t, c'_s>``."""
    cols = torch.bmm(cols_a, cols_b.transpose(1, 2))  # [B, Ta, Tb]
    return row_dot_(_row_gram(rows_a, rows_b).to(cols.dtype), cols)


def _row_gram(a: Tensor, b: Tensor) -> Tensor:
    """``<r_t, r'_s>`` [B, Ta, Tb]; integer rows are token ids (one-hot rows)."""
    a_ids, b_ids = not a.is_floating_point(), not b.is_floating_point()
    if a_ids and b_ids:
        return a.unsqueeze(2) == b.unsqueeze(1)
    if a_ids:  # b[s, a_t]
        return b.gather(2, a.unsqueeze(1).expand(-1, b.shape[1], -1)).transpose(1, 2)
    if b_ids:  # a[t, b_s]
        return a.gather(2, b.unsqueeze(1).expand(-1, a.shape[1], -1))
    return torch.bmm(a, b.transpose(1, 2))


def _cross_terms_are_cheaper(uses: list[list[Tensor]]) -> bool:
    """Gram products (T*T' (d + p) per pair, T*T' d with ids) against instantiating every use
    (p*d per token); with only ids (an embedding used twice) p is unknown and the Gram wins."""
    dense = [rows for rows, _ in uses if rows.is_floating_point()]
    if not dense:
        return True
    p, d = dense[0].shape[-1], uses[0][1].shape[-1]
    tokens = [rows.shape[1] for rows, _ in uses]
    gram = sum(
        tokens[k] * tokens[l] * (d + (p if uses[k][0].is_floating_point() and uses[l][0].is_floating_point() else 1))
        for k in range(len(uses)) for l in range(k + 1, len(uses))
    )
    return gram <= p * d * sum(tokens)


def _parameter_shape(uses: list[list[Tensor]]) -> torch.Size:
    for use in uses:
        if len(use) == 1:
            return use[0].shape[1:]
    rows = next(rows for rows, _ in uses if rows.is_floating_point())
    return torch.Size((rows.shape[-1], uses[0][1].shape[-1]))


def _instantiate(use: list[Tensor], shape: torch.Size) -> Tensor:
    if len(use) == 1:
        return use[0]
    rows, cols = use
    if rows.is_floating_point():
        return torch.bmm(rows.transpose(1, 2), cols.to(rows.dtype))
    grads = cols.new_zeros((cols.shape[0], shape[0], cols.shape[2]))
    return grads.scatter_add_(1, rows.unsqueeze(-1).expand_as(cols), cols)
