"""Buffers that change during private training: released with the model, without noise."""

from __future__ import annotations

from lightning.pytorch.utilities import rank_zero_warn
from torch import nn


class ChangedBuffers:
    """Warns once about each buffer of the trained module that changes between steps.

    Buffers are saved with the model and read by later steps, and no noise reaches them. One
    computed from the training data (a running mean of outputs, a queue of features: what
    BatchNorm, refused, does with its statistics) releases those examples outside the guarantee,
    and nothing in the gradient path can bound it. One computed from the parameters alone (an
    EMA of the weights, ``spectral_norm``'s power iteration) is post-processing and fine. Only
    the user can tell the two apart, so this warns instead of refusing.
    """

    def __init__(self) -> None:
        self._last: dict[str, tuple[int, int]] = {}
        self._warned: set[str] = set()

    def check(self, module: nn.Module) -> None:
        """Call once per step, before the release; compares with the previous step."""
        changed = []
        for name, buffer in module.named_buffers():
            seen = (id(buffer), buffer._version)  # replaced, or changed in place
            if self._last.get(name, seen) != seen and name not in self._warned:
                changed.append(name)
            self._last[name] = seen
        if changed:
            self._warned.update(changed)
            rank_zero_warn(
                f"lightning-dp: buffers {changed} of the {type(module).__name__} changed during "
                "training. Buffers are saved with the model and read by later steps without "
                "noise, so one computed from the training data (a running mean of outputs or "
                "batch statistics, a queue of features) is released outside the privacy "
                "guarantee. One computed from the parameters alone (an EMA of the weights, "
                "spectral_norm's power iteration) is fine."
            )
