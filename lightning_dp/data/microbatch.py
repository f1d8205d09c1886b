"""Split a logical (Poisson) batch into memory-bounded physical micro-batches.

Noise is added once per logical batch, after the clipped per-example gradients of all its
micro-batches are summed; splitting only bounds memory and must not change the result.

Fixed-shape mode pads every micro-batch to exactly ``max_physical_batch_size`` rows, so
varying Poisson batch sizes never trigger recompilation, and carries a boolean ``mask`` of
real rows. Padded rows must contribute exactly zero gradient: multiply (select) per-example
losses by the mask before summing, e.g. with ``masked_sum``. A padded row that leaks into the
sum adds a second copy of some example's gradient and breaks the sensitivity bound.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["MicroBatch", "masked_sum", "pad_batch", "split_logical_batch"]


def _fail(name: str, value: object, why: str, fix: str) -> None:
    raise ValueError(f"`{name}`={value!r} is invalid: {why}. {fix}")


@dataclass(frozen=True)
class MicroBatch:
    """Dataset indices of one physical batch and the mask of real (non-padding) rows."""

    indices: list[int]
    mask: torch.Tensor

    @property
    def num_real(self) -> int:
        """Number of real examples (the rest is padding)."""
        return int(self.mask.sum())


def split_logical_batch(
    indices: Sequence[int],
    max_physical_batch_size: int,
    *,
    pad: bool = False,
    pad_index: int = 0,
) -> list[MicroBatch]:
    """Split a logical batch, in order, into micro-batches of at most the given size.

    Without ``pad`` an empty logical batch gives no micro-batches: the caller still takes the
    noise step for it. With ``pad`` every micro-batch has exactly ``max_physical_batch_size``
    rows; the last is filled with ``pad_index`` (any valid dataset index, masked out), and an
    empty logical batch gives one fully padded micro-batch so the compiled step still runs.
    """
    if isinstance(max_physical_batch_size, bool) \
            or not isinstance(max_physical_batch_size, numbers.Integral) \
            or max_physical_batch_size < 1:
        _fail("max_physical_batch_size", max_physical_batch_size,
              "a micro-batch must hold at least one example", "Pass an int >= 1.")
    indices = [int(i) for i in indices]
    size = int(max_physical_batch_size)
    chunks = [indices[i:i + size] for i in range(0, len(indices), size)]
    if not pad:
        return [MicroBatch(c, torch.ones(len(c), dtype=torch.bool)) for c in chunks]
    return [
        MicroBatch(c + [pad_index] * (size - len(c)), torch.arange(size) < len(c))
        for c in chunks or [[]]
    ]


def _find_tensors(batch: Any, path: str, found: list[tuple[str, torch.Tensor]]) -> None:
    """Collect (path, tensor) for every tensor leaf, checking each has a batch dimension."""
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 0:
            _fail(path, batch, "a collated tensor needs a batch dimension 0",
                  "Collate per-example values into tensors of shape (batch, ...).")
        found.append((path, batch))
    elif isinstance(batch, Mapping):
        for key, value in batch.items():
            _find_tensors(value, f"{path}[{key!r}]", found)
    elif isinstance(batch, (tuple, list)):
        for i, value in enumerate(batch):
            _find_tensors(value, f"{path}[{i}]", found)


def _pad(batch: Any, size: int, fill_value: float) -> Any:
    if isinstance(batch, torch.Tensor):
        filler = batch.new_full((size - batch.shape[0], *batch.shape[1:]), fill_value)
        return torch.cat([batch, filler])
    if isinstance(batch, Mapping):
        return type(batch)({k: _pad(v, size, fill_value) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_pad(v, size, fill_value) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(_pad(v, size, fill_value) for v in batch)
    return batch


def pad_batch(batch: Any, size: int, *, fill_value: float = 0) -> tuple[Any, torch.Tensor]:
    """Pad every tensor of a collated batch along dim 0 to ``size`` rows of ``fill_value``.

    Walks nested dicts, lists, tuples and namedtuples; other leaves are returned unchanged.
    Padding rows are constant filler, not copies of real examples.

    Returns:
        The padded batch and a bool mask of shape (size,), True for the real rows, on the
        device of the first tensor.
    """
    found: list[tuple[str, torch.Tensor]] = []
    _find_tensors(batch, "batch", found)
    if not found:
        _fail("batch", batch, "it contains no tensors to pad", "Pass a collated batch.")
    first_path, first = found[0]
    real = first.shape[0]
    for path, tensor in found:
        rows = tensor.shape[0]
        if rows != real:
            _fail(path, rows, f"its batch dimension differs from {first_path}'s ({real})",
                  "Every tensor of a collated batch needs the same size along dim 0.")
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < real:
        _fail("size", size, f"the batch already has {real} rows",
              "Pass a size >= the batch size (the max physical batch size).")
    return _pad(batch, int(size), fill_value), torch.arange(int(size), device=first.device) < real


def masked_sum(per_example_loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of per-example losses over real rows; padded rows get exactly zero gradient.

    Uses selection rather than multiplication, so even a NaN or inf loss on a padded row does
    not reach the sum. ``per_example_loss`` has shape (batch, ...) with one row per example
    and must not be averaged over the batch (a mean shrinks per-example gradients by 1/B).
    """
    if mask.dtype != torch.bool or mask.dim() != 1:
        _fail("mask", mask, "it must be a 1-D bool tensor", "Pass MicroBatch.mask.")
    if per_example_loss.dim() == 0 or per_example_loss.shape[0] != mask.shape[0]:
        _fail("per_example_loss", tuple(per_example_loss.shape),
              f"it needs one row per example, matching the mask's {mask.shape[0]} rows",
              "Compute the loss with reduction='none'.")
    mask = mask.to(per_example_loss.device).view(-1, *([1] * (per_example_loss.dim() - 1)))
    return torch.where(mask, per_example_loss, per_example_loss.new_zeros(())).sum()
