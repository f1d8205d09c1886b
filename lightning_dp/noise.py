"""Gaussian noise for the summed clipped gradient, added once per logical batch.

The released update is (sum_i clip(g_i) + N(0, sigma^2 S^2 I)) / (q N): noise with std
sigma * S (S the L2 sensitivity of the sum), then division by the EXPECTED batch size q N.
Dividing by the realised batch size would leak it. The gradients passed in must be the plain
sum of clipped per-example gradients (undo any averaging by a data-parallel reduction first).

Under sharding (FSDP2 DTensor gradients with ``Shard`` placements) each rank adds noise only
to the shard it owns, from its own generator, so every coordinate gets noise exactly once and
noise memory is 1/world_size. Streams must be independent across ranks: make each rank's
generator with ``make_noise_generator(seed, rank=rank)``. Reusing one generator across steps
gives independent noise per step.
"""

from __future__ import annotations

import math
import numbers
import secrets
from collections.abc import Iterable

import numpy as np
import torch

__all__ = ["add_noise_and_normalize", "make_noise_generator", "standard_normal"]

# Domain tag mixed into the seed, so noise never reuses the sampler's stream for one seed.
_NOISE_STREAM = 0x4E4F4953
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _fail(name: str, value: object, why: str, fix: str) -> None:
    raise ValueError(f"`{name}`={value!r} is invalid: {why}. {fix}")


def make_noise_generator(
    seed: int | None = None,
    *,
    rank: int = 0,
    device: torch.device | str = "cpu",
    secure_mode: bool = False,
) -> torch.Generator:
    """A generator for this rank's noise, independent of every other rank's.

    The stream is seeded from (seed, rank) through numpy's SeedSequence. With ``seed=None``
    the base seed is drawn from torch's global RNG (reproducible under ``seed_everything``).

    Secure mode seeds from 63 bits of OS entropy (``secrets``) and refuses a seed, so the
    noise cannot be regenerated from a known or guessed seed. ``add_noise_and_normalize``
    with ``secure_mode=True`` then also hardens each draw against floating-point attacks (see
    there). Threat model: an adversary who sees the released model (or every update) but not
    the process memory. Not protected: torch's generators are not CSPRNGs (their state could
    in principle be inferred from enough raw outputs, which are never released directly here),
    and timing side channels.
    """
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 0:
        _fail("rank", rank, "it must be an int >= 0", "Pass this process's global rank.")
    if secure_mode:
        if seed is not None:
            _fail("seed", seed, "secure mode draws its seed from OS entropy; a known seed "
                  "makes the noise reproducible by anyone who knows it",
                  "Pass seed=None with secure_mode=True, or turn secure mode off.")
        stream_seed = secrets.randbits(63)
    else:
        if seed is None:
            seed = int(torch.randint(0, 2**63 - 1, ()))
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            _fail("seed", seed, "it must be an int >= 0 or None", "Pass e.g. seed=42.")
        state = np.random.SeedSequence([int(seed), int(rank), _NOISE_STREAM]).generate_state(
            1, np.uint64)[0]
        stream_seed = int(state) >> 1
    return torch.Generator(device=device).manual_seed(stream_seed)


def _check_number(name: str, value: object, *, allow_zero: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        _fail(name, value, f"it must be a finite number {'>=' if allow_zero else '>'} 0",
              "Pass the values the privacy accountant was given (q * N for the batch size).")
    return float(value)


def _local_shard(
    param_index: int, grad: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """The tensor this rank noises: the grad itself, or a DTensor's local shard."""
    if not torch.distributed.is_available():
        return grad
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(grad, DTensor):
        return grad

    if not all(isinstance(p, Shard) for p in grad.placements):
        _fail(f"params[{param_index}].grad.placements", grad.placements,
              "noise is added per rank to the local shard; a replicated or partial gradient "
              "would get a different draw on each replica or noise summed over ranks",
              "Reduce-scatter the gradient to Shard placements before adding noise.")
    if generator is None:
        _fail("generator", generator, "sharded gradients need a per-rank noise stream; the "
              "default generator is usually seeded identically on every rank, which "
              "correlates the noise across shards",
              "Pass make_noise_generator(seed, rank=rank, device=...).")
    return grad.to_local()


@torch.no_grad()
def add_noise_and_normalize(
    params: Iterable[torch.Tensor],
    *,
    noise_multiplier: float,
    sensitivity: float,
    expected_batch_size: float,
    generator: torch.Generator | None = None,
    secure_mode: bool = False,
) -> None:
    """Add N(0, (noise_multiplier * sensitivity)^2) to each grad, then divide by q N in place.

    Call once per logical batch, after all micro-batches are accumulated. A parameter whose
    ``.grad`` is None (e.g. after an empty Poisson batch) gets a zero gradient first, so it
    is still noised. A parameter with ``requires_grad=False`` is skipped unless it holds a
    gradient (frozen after the backward: an optimizer still steps it). Low-precision grads
    (fp16/bf16) are noised and divided in float32, then rounded once.

    Args:
        params: Trainable parameters whose ``.grad`` holds the sum of clipped gradients.
        noise_multiplier: sigma, in units of the sensitivity; 0 only normalises.
        sensitivity: L2 sensitivity S of the summed gradient, sqrt(sum_k C_k^2) for disjoint
            clipping groups.
        expected_batch_size: q * N over all ranks, never the realised batch size.
        generator: This rank's noise stream (see ``make_noise_generator``); None uses torch's
            default generator of the grad's device (single process only).
        secure_mode: draw each coordinate as ``(z1 + z2) / sqrt(2)`` of two float64 normals,
            then round once. Floating-point attacks (Mironov 2012; Jin et al. 2022) read the
            gaps and irregular spacing of single floating-point Gaussian samples to tell
            neighbouring outputs apart; a sum of independent samples in higher precision fills
            those gaps (Holohan and Braghin 2021). Twice the random draws.
    """
    std = (_check_number("noise_multiplier", noise_multiplier, allow_zero=True)
           * _check_number("sensitivity", sensitivity, allow_zero=False))
    divisor = _check_number("expected_batch_size", expected_batch_size, allow_zero=False)
    for index, param in enumerate(params):
        if not param.requires_grad and param.grad is None:
            continue
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        local = _local_shard(index, param.grad, generator)
        if not local.is_floating_point():
            _fail(f"params[{index}].grad.dtype", local.dtype, "noise needs a floating grad",
                  "Train this parameter in a floating-point dtype.")
        if generator is not None and generator.device.type != local.device.type:
            _fail("generator", generator.device, f"params[{index}].grad is on {local.device}",
                  "Create the generator with make_noise_generator(..., device=grad.device).")
        work_dtype = torch.float32 if local.dtype in _LOW_PRECISION else local.dtype
        work = local if work_dtype == local.dtype else local.to(work_dtype)
        if std > 0:
            work.add_(standard_normal(local.shape, work_dtype, local.device, generator, secure_mode), alpha=std)
        work.div_(divisor)
        if work is not local:
            local.copy_(work)


def standard_normal(
    shape: torch.Size | tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device | str,
    generator: torch.Generator | None,
    secure_mode: bool = False,
) -> torch.Tensor:
    """N(0, 1) draws; in secure mode ``(z1 + z2) / sqrt(2)`` of two float64 normals, rounded once
    (see ``add_noise_and_normalize``). Every noisy release of the library draws through here."""
    if not secure_mode:
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    draws = torch.randn((2, *shape), generator=generator, device=device, dtype=torch.float64)
    return (draws.sum(0) / math.sqrt(2)).to(dtype)
