"""White-box canary trials through lightning-dp's real DP step, for the empirical privacy audit.

The audited mechanism is one DP step as the strategies run it: ``PoissonBatchSampler`` draws the
logical batch, the ``make_private`` engine clips every per-example gradient and sums them, and
``PrivateTraining.noise_and_normalize`` adds ``N(0, (sigma S)^2)`` per coordinate (S from the
engine's clipping groups), divides by the expected batch size ``qN`` and charges its ledger.

Trials are folded into that one step. The dataset holds ``trials`` blocks of
``examples_per_trial`` examples; block t's first example is canary t, whose per-example gradient
is ``10 C`` on embedding row t (no other example touches it), so after clipping it is exactly C
there. The other examples are background with gradients ``N(0, (2C)^2)`` on shared rows (about
60% of them clipped). Each example is Poisson-sampled independently and clipped on its own, and
the noise is independent per coordinate, so the released rows ``0..trials-1`` are independent
draws of the single-canary statistic "canary coordinate of the released update": one backward,
one sampler draw and one noise draw give every trial, all through the library's own code.
``release_one_step_at_a_time`` runs trials as literal separate steps, to check the folding.

The "without" world removes every canary from the batch. Both worlds divide by the same
``qN``: N is public, as the accountant assumes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from lightning_dp.strategies.private_training import PrivacySettings, PrivateTraining, SpeedSettings

CANARY_GRADIENT = 10.0  # the canary's per-example gradient in units of C: always clipped to C
BACKGROUND_GRADIENT = 2.0  # std of the background examples' gradients in units of C


@dataclass(frozen=True)
class AuditSetup:
    """One DP step's privacy parameters and the shape of the audited dataset."""

    noise_multiplier: float
    sample_rate: float
    examples_per_trial: int = 4
    max_grad_norm: float = 1.0


class CanaryModel(nn.Module):
    """Per-example loss ``scale_i * w[row_i]``: example i's gradient is ``scale_i`` on its row."""

    def __init__(self, rows: int) -> None:
        super().__init__()
        self.table = nn.Embedding(rows, 1)

    def forward(self, rows: Tensor, scales: Tensor) -> Tensor:
        return self.table(rows).squeeze(1) * scales


def _private_training(setup: AuditSetup, seed: int) -> PrivateTraining:
    privacy = PrivacySettings(clipping="flat", max_grad_norm=setup.max_grad_norm,
                              noise_multiplier=setup.noise_multiplier)
    return PrivateTraining(privacy, SpeedSettings(), seed=seed, loss_reduction="sum")


def _examples(
    indices: Tensor, setup: AuditSetup, trials: int, with_canary: bool, seed: int
) -> tuple[Tensor, Tensor]:
    """Embedding row and gradient of each sampled dataset index (canaries dropped if absent)."""
    trial, slot = indices // setup.examples_per_trial, indices % setup.examples_per_trial
    is_canary = slot == 0
    if not with_canary:
        indices, trial, slot, is_canary = (t[~is_canary] for t in (indices, trial, slot, is_canary))
    generator = torch.Generator().manual_seed(seed)
    background = torch.randn(trials * setup.examples_per_trial, generator=generator,
                             dtype=torch.float64) * BACKGROUND_GRADIENT
    rows = torch.where(is_canary, trial, trials + slot)
    scales = torch.where(is_canary, CANARY_GRADIENT, background[indices]) * setup.max_grad_norm
    return rows, scales


def _release(training: PrivateTraining, model: CanaryModel, rows: Tensor, scales: Tensor) -> Tensor:
    """One DP step: clipped per-example sum, then noise and division by qN."""
    model.zero_grad(set_to_none=True)
    model(rows, scales).sum().backward()
    training.noise_and_normalize(model, rank=0, device=torch.device("cpu"))
    return model.table.weight.grad[:, 0]


def release_canary_coordinates(
    setup: AuditSetup, trials: int, *, with_canary: bool, seed: int
) -> tuple[np.ndarray, PrivateTraining]:
    """The released canary coordinate of ``trials`` independent trials, in units of C/(qN).

    In these units the coordinate is ``1[canary sampled] + N(0, sigma^2)``. Also returns the
    ``PrivateTraining`` whose ledger holds what the accountant was told.
    """
    training = _private_training(setup, seed)
    num_samples = trials * setup.examples_per_trial
    sampler = training.make_sampler(num_samples, setup.sample_rate, rank=0, world_size=1)
    indices = torch.tensor(next(iter(sampler)), dtype=torch.long)
    model = CanaryModel(trials + setup.examples_per_trial).double()
    training.make_private(model)
    released = _release(training, model, *_examples(indices, setup, trials, with_canary, seed))
    unit = setup.max_grad_norm / training.expected_batch_size
    return (released[:trials] / unit).numpy(), training


def release_one_step_at_a_time(
    setup: AuditSetup, trials: int, *, with_canary: bool, seed: int
) -> np.ndarray:
    """One trial per literal DP step on a dataset of one block; same units as above."""
    training = _private_training(setup, seed)
    sampler = training.make_sampler(setup.examples_per_trial, setup.sample_rate, rank=0, world_size=1)
    model = CanaryModel(1 + setup.examples_per_trial).double()
    training.make_private(model)
    unit = setup.max_grad_norm / training.expected_batch_size
    released = np.empty(trials)
    trial = 0
    while trial < trials:  # each pass over the sampler continues the same random stream
        for batch in sampler:
            if trial == trials:
                break
            rows, scales = _examples(torch.tensor(batch, dtype=torch.long), setup, 1, with_canary, seed + trial)
            released[trial] = float(_release(training, model, rows, scales)[0]) / unit
            trial += 1
    return released
