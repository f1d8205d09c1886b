"""Poisson sampling of logical batches: the sampling the accountant's guarantee assumes."""

from __future__ import annotations

import numbers
import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

__all__ = ["PoissonBatchSampler"]

# Domain tag mixed into the seed, so a sampler and a noise generator given the same seed
# never share a random stream.
_SAMPLER_STREAM = 0x53414D50
_SECURE_BITS = 53


def _fail(name: str, value: object, why: str, fix: str) -> None:
    raise ValueError(f"`{name}`={value!r} is invalid: {why}. {fix}")


def _rank_seed(generator: torch.Generator | int | None, rank: int) -> int:
    """Seed of this rank's stream: independent across ranks, reproducible from one seed."""
    if generator is None or isinstance(generator, torch.Generator):
        # Like torch's RandomSampler: draw a base seed, reproducible under seed_everything.
        base = int(torch.randint(0, 2**63 - 1, (), generator=generator))
    elif isinstance(generator, numbers.Integral) and not isinstance(generator, bool) \
            and generator >= 0:
        base = int(generator)
    else:
        _fail("generator", generator, "it must be a torch.Generator, a seed int >= 0 or None",
              "Pass e.g. generator=42.")
    return int(np.random.SeedSequence([base, rank, _SAMPLER_STREAM]).generate_state(
        1, np.uint64)[0])


class PoissonBatchSampler(Sampler[list[int]]):
    """Yields logical batches in which every example appears independently with probability q.

    This is the sampling under which the accountant's amplification holds; shuffled or
    fixed-size batches do not get that guarantee. Batch sizes are Binomial(N, q), so they vary
    and may be 0: empty batches are yielded, never skipped (the step must still add noise and
    be counted). One pass (``len``) is ``steps`` batches, by default round(1/q), one expected
    epoch; iterating again continues the same random stream.

    Distributed: rank r owns the indices r, r + W, r + 2W, ... and samples them with the same
    q from its own stream, so every example is still included independently with probability
    q, and together the ranks form one Poisson batch. All ranks yield ``steps`` batches.

    Resuming: batch k of the stream is drawn from a generator seeded by (this rank's seed, k),
    so the stream can restart at any batch. ``state_dict(consumed=k)`` names batch k as the
    next one, which is what a training loop must save: data loaders prefetch, so the sampler
    has usually drawn ahead of the batches actually trained on. After ``load_state_dict`` the
    next iteration continues at that batch of the identical stream.

    Secure mode draws every inclusion decision from the operating system's CSPRNG
    (``os.urandom``, q rounded to a multiple of 2^-53), so batch membership cannot be predicted
    or reconstructed from a seed or from a PRNG state recovered by an adversary. It refuses an
    explicit generator or seed, and a resumed secure run continues with fresh entropy.

    Args:
        num_samples: Dataset size N (all ranks together).
        sample_rate: Inclusion probability q in (0, 1].
        steps: Batches per pass; default round(1/q).
        generator: torch.Generator or int seed (rank streams are derived from it); None draws
            the seed from torch's global RNG.
        rank: This process's rank.
        world_size: Number of ranks.
        secure_mode: Draw from OS entropy instead of a seeded PRNG.
    """

    def __init__(
        self,
        num_samples: int,
        sample_rate: float,
        *,
        steps: int | None = None,
        generator: torch.Generator | int | None = None,
        rank: int = 0,
        world_size: int = 1,
        secure_mode: bool = False,
    ) -> None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral) \
                or num_samples < 1:
            _fail("num_samples", num_samples, "the dataset size must be an int >= 1",
                  "Pass len(dataset).")
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, numbers.Real) \
                or not 0 < sample_rate <= 1:
            _fail("sample_rate", sample_rate, "an inclusion probability must lie in (0, 1]",
                  "Pass expected_batch_size / num_samples.")
        if isinstance(world_size, bool) or not isinstance(world_size, numbers.Integral) \
                or world_size < 1:
            _fail("world_size", world_size, "it must be an int >= 1",
                  "Pass the number of training processes.")
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) \
                or not 0 <= rank < world_size:
            _fail("rank", rank, f"it must be an int in [0, world_size={world_size})",
                  "Pass this process's global rank.")
        if steps is None:
            steps = max(1, round(1 / sample_rate))
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
            _fail("steps", steps, "batches per pass must be an int >= 1",
                  "Pass steps=None for one expected epoch (round(1/q)).")
        if secure_mode and generator is not None:
            _fail("generator", generator, "secure mode draws from OS entropy and must not be "
                  "seeded, or batch membership becomes predictable",
                  "Pass generator=None with secure_mode=True, or turn secure mode off.")
        self.num_samples = int(num_samples)
        self.sample_rate = float(sample_rate)
        self.steps = int(steps)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.secure_mode = bool(secure_mode)
        self._indices = torch.arange(self.rank, self.num_samples, self.world_size)
        self._seed = None if self.secure_mode else _rank_seed(generator, self.rank)
        self._next_batch = 0  # stream index of the next batch to draw
        self._position = 0  # index of the next batch within the current pass
        self._resume_at = 0
        self._positions: dict[int, int] = {}  # stream index -> position, for batches drawn

    @property
    def expected_batch_size(self) -> float:
        """q * N over all ranks: the divisor for the noisy gradient sum, never the realised size."""
        return self.sample_rate * self.num_samples

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        self._position, self._resume_at = self._resume_at, 0
        self._positions = {k: p for k, p in self._positions.items() if k >= self._next_batch - self.steps}
        while self._position < self.steps:
            batch = self._draw(self._next_batch)
            self._positions[self._next_batch] = self._position
            self._next_batch += 1
            self._position += 1
            yield batch

    def _draw(self, batch_index: int) -> list[int]:
        n = len(self._indices)
        if self.secure_mode:
            bits = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(64 - _SECURE_BITS)
            keep = torch.from_numpy(bits < np.uint64(round(self.sample_rate * 2**_SECURE_BITS)))
        else:
            seed = np.random.SeedSequence([self._seed, batch_index]).generate_state(1, np.uint64)[0]
            generator = torch.Generator().manual_seed(int(seed))
            keep = torch.rand(n, generator=generator, dtype=torch.float64) < self.sample_rate
        return self._indices[keep].tolist()

    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        """Where the stream stands: by default after the batches drawn so far; with
        ``consumed=k``, just after the first k batches of the stream (those trained on)."""
        next_batch, position = self._next_batch, self._position
        if consumed is not None and consumed != self._next_batch:
            if consumed - 1 not in self._positions and consumed != 0:
                _fail("consumed", consumed, f"the sampler has not drawn batch {consumed - 1} "
                      "in its current or previous pass", "Pass the number of batches trained on.")
            next_batch = consumed
            position = self._positions[consumed - 1] + 1 if consumed else 0
        return {
            "num_samples": self.num_samples,
            "sample_rate": self.sample_rate,
            "rank": self.rank,
            "world_size": self.world_size,
            "secure_mode": self.secure_mode,
            "seed": self._seed,
            "next_batch": next_batch,
            "position": position,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Continue a saved stream: the next iteration resumes at the next batch."""
        for key in ("num_samples", "sample_rate", "rank", "world_size", "secure_mode"):
            saved, current = state_dict.get(key), getattr(self, key)
            if saved != current:
                _fail(f"state_dict[{key!r}]", saved,
                      f"the sampler was built with {key}={current!r}; resuming with a different "
                      "sampling setup would break the stream and the privacy accounting",
                      f"Rebuild the sampler with {key}={saved!r}.")
        self._seed = state_dict["seed"]
        self._next_batch = int(state_dict["next_batch"])
        position = int(state_dict["position"])
        # A pass saved at its end resumes at the start of the next pass.
        self._position = self._resume_at = 0 if position >= self.steps else position
