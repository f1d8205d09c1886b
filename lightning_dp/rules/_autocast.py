"""Autocast inside DP primitives: cast once in forward, then run the op with autocast off."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast compute dtype active for ``device_type``, or None when autocast is off."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def cast_for_autocast(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Cast floating tensors to the autocast dtype (as autocast would for a matmul/conv op)."""
    first = next(t for t in tensors if t is not None)
    dtype = autocast_dtype(first.device.type)
    if dtype is None:
        return tensors
    return tuple(
        t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors
    )


def no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast off inside the primitive (a no-op context when it is off already: entering
    ``torch.autocast`` costs more than some of the small ops it would wrap)."""
    if not torch.is_autocast_enabled(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)
