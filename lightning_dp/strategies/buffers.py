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

    #: the module tree is walked again every this many checks (buffers registered later)
    REWALK = 100

    def __init__(self) -> None:
        self._last: dict[str, tuple[int, int]] = {}
        self._warned: set[str] = set()
        self._owners: list[tuple[str, nn.Module, str]] = []
        self._root: nn.Module | None = None
        self._checks = 0

    def check(self, module: nn.Module) -> None:
        """Call once per step, before the release; compares with the previous step. Each
        buffer is looked up in its owner's ``_buffers`` (a replaced one is seen), without a
        walk of the whole module tree at every step."""
        if self._checks % self.REWALK == 0 or module is not self._root:
            self._root = module
            self._owners = [(f"{path}.{name}" if path else name, owner, name)
                            for path, owner in module.named_modules() for name in owner._buffers]
        self._checks += 1
        changed = []
        for full_name, owner, name in self._owners:
            buffer = owner._buffers.get(name)
            if buffer is None:
                continue
            seen = (id(buffer), buffer._version)  # replaced, or changed in place
            if self._last.get(full_name, seen) != seen and full_name not in self._warned:
                changed.append(full_name)
            self._last[full_name] = seen
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
