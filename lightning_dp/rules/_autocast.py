"""Autocast inside DP primitives: cast once in forward, then run the op with autocast off.

Autocast is off in most steps, so that case costs one check and no new object: these run in
every private module's forward, where entering ``torch.autocast`` (or even building a no-op
context) costs more than some of the small ops it would wrap.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

#: The context of a primitive's op when autocast is off already (stateless, so shared).
_ALREADY_OFF = contextlib.nullcontext()


def cast_for_autocast(
    x: Tensor, *others: Tensor | None
) -> tuple[tuple[Tensor | None, ...], contextlib.AbstractContextManager]:
    """``(x, *others)`` cast to the autocast dtype (as autocast would for a matmul or conv op),
    and the context to run the op in: autocast off. When autocast is off: the tensors as they
    are and a shared no-op context."""
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return (x, *others), _ALREADY_OFF
    dtype = torch.get_autocast_dtype(device_type)
    cast = tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in (x, *others))
    return cast, torch.autocast(device_type, enabled=False)


def no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast off inside the primitive (a shared no-op context when it is off already)."""
    if not torch.is_autocast_enabled(device_type):
        return _ALREADY_OFF
    return torch.autocast(device_type, enabled=False)
