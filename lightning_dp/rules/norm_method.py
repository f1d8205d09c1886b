"""Ghost norm or instantiation for a layer whose per-example gradient is ``g_i^T x_i``.

Both give the same norms and clipped sums (up to rounding); only speed and memory differ, so
this is a speed setting, kept out of the privacy card. ``"auto"`` decides from the shape with a
cost model, ``"measure"`` times both on the running device once per shape.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from typing import Literal

import torch

from lightning_dp.rules.protocol import GradUse, examples_per_chunk

NormMethod = Literal["auto", "ghost", "instantiate", "measure"]

#: Instantiate per-example weight gradients only while they fit in this many elements.
INSTANTIATE_MAX_NUMEL = 2**26
#: Ghost norms cost T^2 (p + d) multiply-adds per example beyond the weight gradient, which
#: instantiation gets for free (its clipped sum needs no second matmul); instantiation instead
#: writes and reads p*d elements per example about three times. These are the multiply-adds one
#: such element is worth: chosen from CPU measurements (bench/RESULTS.md, "Issue 2" and
#: "Scaling"; ``bench/norm_methods.py`` checks the choice per shape), and estimated for
#: accelerators from an H100's ratio of bandwidth to matmul throughput (not yet measured).
GHOST_WORK_PER_ELEMENT = {"cpu": 15}
GHOST_WORK_PER_ELEMENT_ACCELERATOR = 300
#: ...and on the CPU when the instantiated gradients do not fit in the clipping workspace, so
#: that they are made in chunks, each streamed through memory with its own round of small ops
#: (a GPT's LM head at T=64: bench/RESULTS.md, "the LM head in chunks").
CHUNKED_GHOST_WORK_PER_ELEMENT = {"cpu": 45}


def choose_norm_method(
    batch: int, tokens: int, p: int, d: int, method: str, device: str = "cpu", spare: int | None = None,
) -> str:
    """Ghost norm when its extra work, T^2 (p + d) per example, costs less than moving the
    instantiated p*d gradients (DESIGN §3's comparison, with instantiation's free weight
    gradient counted); instantiation only while it fits in memory. ``spare``: the elements the
    running backward has freed, where the clipper may cut instantiation into chunks (None: it
    never does), which costs each instantiated element more when they do not fit beside the
    call's factors and those. ``"measure"`` is decided by :func:`fastest_method`; where it
    cannot run (compiled graphs) it falls back to this."""
    if method not in ("auto", "measure"):
        return method
    if tokens == 1:
        return "ghost"  # ||g_i||^2 * ||x_i||^2: trivially cheap
    if batch * p * d > INSTANTIATE_MAX_NUMEL:
        return "ghost"
    worth = GHOST_WORK_PER_ELEMENT.get(device, GHOST_WORK_PER_ELEMENT_ACCELERATOR)
    if spare is not None and examples_per_chunk(batch, p * d, tokens * (p + d), spare) < batch:
        worth = CHUNKED_GHOST_WORK_PER_ELEMENT.get(device, worth)
    if tokens * tokens * (p + d) < worth * p * d:
        return "ghost"
    return "instantiate"


def can_measure(method: str, batch: int, tokens: int, p: int, d: int) -> bool:
    """``"measure"`` times both methods when both are possible (instantiation fits in memory,
    the sequence is longer than one token), there is an example to time, and the code runs
    eagerly."""
    return (method == "measure" and batch > 0 and tokens > 1
            and batch * p * d <= INSTANTIATE_MAX_NUMEL and not torch.compiler.is_compiling())


#: (layer kind, device type, dtype, shapes) -> the method that ran faster for it
_FASTEST: dict[Hashable, str] = {}


def batch_bucket(batch: int) -> int:
    """The batch size as it enters a measuring key: rounded up to a power of two, so that
    Poisson-sampled batches (a new size nearly every step) are timed a few times, not per size."""
    return 1 << max(batch - 1, 0).bit_length()


def fastest_method(
    key: Hashable, batch: int, workspace: int, held: int, build: Callable[[str, int], GradUse]
) -> str:
    """The faster method for this shape on this device, timed once and then remembered.

    ``build(method, k)`` gives the call's first ``k`` examples as a use with that method; ``k``
    is the chunk the clipper would use for instantiation (``workspace`` and ``held`` elements
    per example), so that measuring never takes more memory than clipping. Each method runs
    its weight's norm and clipped sum three times, the first as warm-up.
    """
    if key not in _FASTEST:
        k = examples_per_chunk(batch, workspace, held)
        _FASTEST[key] = min(("ghost", "instantiate"), key=lambda m: _seconds(build, m, k))
    return _FASTEST[key]


#: Bytes written before each timed run, to push the layer's tensors out of the caches: in a
#: step, a layer's clipping follows other layers' work and reads its tensors from memory, and
#: timed warm, instantiation's passes over its per-example gradients look 2-4 times cheaper
#: than they are (bench/RESULTS.md, "the cold cost of an op"). Twice the L2 on a GPU.
EVICT_BYTES = 64 * 2**20


def _seconds(build: Callable[[str, int], GradUse], method: str, examples: int) -> float:
    best = float("inf")
    buffer = None
    for run in range(3):
        use = build(method, examples)  # fresh: a use caches its instantiated gradients
        device = use.params["weight"].device
        buffer = write_through_caches(device, buffer)
        _synchronize(device)
        start = time.perf_counter()
        use.clipped_grad("weight", use.norm("weight").clamp(max=1.0))
        _synchronize(device)
        if run:
            best = min(best, time.perf_counter() - start)
    return best


def write_through_caches(device: torch.device, buffer: torch.Tensor | None) -> torch.Tensor:
    """Write ``EVICT_BYTES`` (twice the L2 on a GPU, if more) into ``buffer``, made on first use."""
    if buffer is None:
        size = EVICT_BYTES
        if device.type == "cuda":
            size = max(size, 2 * torch.cuda.get_device_properties(device).L2_cache_size)
        buffer = torch.empty(size // 4, device=device)
    return buffer.fill_(1.0)


def _synchronize(device: torch.device) -> None:
    backend = getattr(torch, device.type, None)
    if device.type != "cpu" and hasattr(backend, "synchronize"):
        backend.synchronize(device)
