"""Bytes of tensor storage torch allocates on the CPU, live and at peak: RSS without the
interpreter, the libraries and the heap's cache.

RSS counts whatever the allocator keeps after a tensor dies, so two runs of one case differ by
tens of MiB and a case that frees early looks no leaner. Inside :class:`TensorBytes` every
storage an aten op returns (or a factory creates) is counted from its creation until it dies.
What an op allocates and frees internally (a kernel's workspace) is not seen; both sides of a
comparison run the same kernels for the same layers, so it matters only where they differ.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class TensorBytes(TorchDispatchMode):
    """Counts the storage bytes live (``live``) and the most at once (``peak``) since entry.

    Storages that existed before entry count only from when an op inside returns them again
    (e.g. a parameter's in-place update): the window measures what its code allocates.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._storages: dict[int, int] = {}  # storage id -> bytes, while it lives

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu":
                self._count(tensor.untyped_storage())
        return out

    def _count(self, storage: torch.UntypedStorage) -> None:
        key = storage._cdata
        if key in self._storages or storage.nbytes() == 0:
            return
        self._storages[key] = storage.nbytes()
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        self.live -= self._storages.pop(key, 0)

    def reset_peak(self) -> None:
        self.peak = self.live
