"""Process-per-case benchmark machinery shared by ``step_time.py`` and ``suite.py``.

Each case runs in a fresh interpreter (so allocator state and peak memory of one case cannot
leak into another) started as ``python <script> --child '<json job>'``; the child prints one
JSON line. Timing is the median over steps after warm-up, with the CPU stall over the timed
steps: the share of wall time in which some runnable task waited for a core (Linux PSI
``/proc/pressure/cpu``); near 0% means nothing competed with the benchmark.

Memory on CPU is process RSS (peak from ``VmHWM``, which ``reset_peak`` rewinds through
``/proc/self/clear_refs``, so one process can probe several batch sizes); on CUDA it is the
caching allocator's allocated bytes (tensors only, excluding the cache).
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any


def spawn(script: str, job: dict, timeout_s: float = 3600) -> dict:
    """Run one case of ``script`` in a fresh interpreter; its JSON result or the error it died with."""
    cmd = [sys.executable, os.path.abspath(script), "--child", json.dumps(job)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {proc.returncode}: {tail}"}
    return json.loads(lines[-1])


def environment(device: str, threads: int) -> str:
    """One line naming torch, the CPU (and GPU), threads and Opacus: printed above every table."""
    import torch

    cpu = "unknown CPU"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)
    parts = [f"torch {torch.__version__}", f"CPU: {cpu} ({os.cpu_count()} cores)"]
    if device == "cpu":
        parts.append(f"{threads} torch threads")
    else:
        parts.append(f"GPU: {torch.cuda.get_device_name()}")
    if importlib.util.find_spec("opacus") is not None:
        import opacus

        parts.append(f"opacus {opacus.__version__}")
    return ", ".join(parts)


def synchronizer(device: Any) -> Callable[[], None]:
    """A call that waits for ``device``'s queued work (nothing to wait for on the CPU), so that
    timings cover the kernels and not only their launch."""
    import torch

    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def time_steps(step: Callable[[], None], device: Any, warmup: int, steps: int,
               after_first: Callable[[], None] = lambda: None) -> dict:
    """Median wall ms and process CPU ms of ``steps`` calls after ``warmup``, CPU stall %, base
    and peak memory (MiB).

    CPU ms (all threads of this process) barely moves when other processes compete for the
    cores, so on a shared machine it compares cases more fairly than wall time does.
    """
    sync = synchronizer(device)
    reset_peak(device)
    base = memory_mib(device, peak=False)
    times, cpu_times = [], []
    stall_start, wall_start = cpu_stall_s(), time.perf_counter()
    for i in range(warmup + steps):
        sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
        cpu_times.append((time.process_time() - cpu_start) * 1e3)
        if i == 0:
            after_first()
    stalled = cpu_stall_s() - stall_start
    return dict(ms=statistics.median(times[warmup:]), cpu_ms=statistics.median(cpu_times[warmup:]),
                base=base, peak=memory_mib(device, peak=True),
                stall=100 * stalled / (time.perf_counter() - wall_start))


def cpu_stall_s() -> float:
    """Seconds (cumulative) during which some runnable task waited for a CPU (Linux PSI)."""
    try:
        with open("/proc/pressure/cpu") as f:
            return int(f.readline().split("total=")[1]) / 1e6
    except (OSError, IndexError, ValueError):
        return float("nan")


def reset_peak(device: Any) -> None:
    """Start a new peak-memory window."""
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass  # peak then covers the whole process: an overestimate, never an underestimate


def release_free_memory(device: Any) -> None:
    """Hand freed memory back (CUDA cache; glibc heap via ``malloc_trim``) so RSS falls again."""
    import ctypes
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: freed memory may be reused unseen, so later probes read low


def memory_mib(device: Any, peak: bool) -> float:
    import torch

    if device.type == "cuda":
        stat = torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()
        return stat / 2**20
    field = "VmHWM" if peak else "VmRSS"
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith(field))
    return kib / 1024


def largest_batch(fits: Callable[[int], bool], start: int, limit: int) -> int | None:
    """Largest batch size in [1, limit] for which ``fits`` holds, assuming it is monotone.

    Doubles from ``start`` until a size does not fit (or ``limit``), then bisects until the
    bracket is within 1/8 of the answer (each probe is two training steps; exactness to one
    example is not worth the time). None if not even batch 1 fits.
    """
    low, high = 0, None  # low fits (0: vacuously), high does not
    size = max(1, min(start, limit))
    while high is None:
        if fits(size):
            low = size
            if size >= limit:
                return size
            size = min(2 * size, limit)
        else:
            high = size
    while high - low > max(1, low // 8):
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low or None


def best_round(rounds: list[dict]) -> dict:
    """The fastest successful round (others only ever add time on a shared machine)."""
    ok = [r for r in rounds if "error" not in r]
    return min(ok, key=lambda r: r["ms"]) if ok else rounds[-1]
