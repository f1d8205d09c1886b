"""Adaptive clipping thresholds: each group's C_k follows a quantile of its per-example norms.

Andrew et al. (2021), applied per group as in He et al. (2022). Each logical step releases, per
group k, the noisy centred count over the step's Poisson batch (all its micro-batches and ranks)

    b_k = sum_i (1[||g_ik|| <= C_k] - 1/2) + N(0, sigma_b^2),

then moves the threshold geometrically toward the target quantile r:

    C_k <- C_k * exp(-eta * (b_k / (q N) + 1/2 - r)).

``b_k / (qN) + 1/2`` is an unbiased estimate of the fraction of examples within C_k that reads
the EXPECTED batch size, never the realised one. Only the noisy counts reach the thresholds, so
the thresholds are post-processing of a Gaussian release: the K centred bits have L2
sensitivity sqrt(K)/2 and are charged jointly with the gradient (``accounting/adaptive.py``).
The gradient of a step is noised with the thresholds that clipped it; they move afterwards.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_dp.engine import Clipper
from lightning_dp.noise import standard_normal

__all__ = [
    "DEFAULT_TARGET_QUANTILE",
    "DEFAULT_THRESHOLD_LR",
    "AdaptiveThresholds",
    "check_adaptive_settings",
    "noisy_counts",
    "updated_thresholds",
]

DEFAULT_TARGET_QUANTILE = 0.5
DEFAULT_THRESHOLD_LR = 0.2


def _fail(name: str, value: object, why: str, fix: str) -> None:
    raise ValueError(f"`{name}`={value!r} is invalid: {why}. {fix}")


def _is_real(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)


def check_adaptive_settings(
    target_quantile: float, threshold_lr: float, count_noise_multiplier: float | None
) -> None:
    """Refuse settings that would make the thresholds diverge or the counts unprivate."""
    if not (_is_real(target_quantile) and 0 < target_quantile < 1):
        _fail("target_quantile", target_quantile, "it is the fraction of examples whose "
              "norm should fall within their group's threshold and must lie in (0, 1)",
              "Pass e.g. 0.5 (the median norm).")
    if not (_is_real(threshold_lr) and threshold_lr > 0):
        _fail("threshold_lr", threshold_lr, "it is the step size of the geometric threshold "
              "update and must be a positive finite number", "Pass e.g. 0.2.")
    if count_noise_multiplier is not None and not (
            _is_real(count_noise_multiplier) and count_noise_multiplier > 0):
        _fail("count_noise_multiplier", count_noise_multiplier, "the per-group counts are "
              "released every step and need Gaussian noise with a positive finite std",
              "Pass e.g. 10.0, or None to spend 5% of the privacy budget on the counts.")


def updated_thresholds(
    thresholds: Mapping[str, float],
    noisy_counts: Mapping[str, float],
    *,
    expected_batch_size: float,
    target_quantile: float,
    threshold_lr: float,
) -> dict[str, float]:
    """One geometric step of every threshold, from its noisy centred count alone."""
    return {
        name: threshold * math.exp(-threshold_lr * (
            noisy_counts[name] / expected_batch_size + 0.5 - target_quantile))
        for name, threshold in thresholds.items()
    }


def noisy_counts(
    counts: Tensor,
    *,
    count_noise_multiplier: float,
    generator: torch.Generator | None,
    add_noise: bool = True,
    sum_across_ranks: Callable[[Tensor], Tensor] | None = None,
    secure_mode: bool = False,
) -> Tensor:
    """Add N(0, sigma_b^2) to the centred counts, once over all ranks, and sum them.

    Under data parallelism every rank holds the counts of its own examples. Only the rank
    with ``add_noise`` adds noise (from its own stream) before ``sum_across_ranks`` adds the
    ranks' tensors, so the total carries exactly one draw per group and every rank receives
    the same noisy counts.
    """
    counts = counts.to(torch.float32)
    if add_noise:
        device = generator.device if generator is not None else counts.device
        counts = counts.to(device) + count_noise_multiplier * standard_normal(
            counts.shape, torch.float32, device, generator, secure_mode)
    return counts if sum_across_ranks is None else sum_across_ranks(counts)


class AdaptiveThresholds:
    """The thresholds of one private model, moved each step by its noisy counts, with history.

    This object is the source of truth: it writes the thresholds into the model's clipper, so a
    checkpoint restored before or after the model is made private continues with them.
    """

    def __init__(self, *, target_quantile: float = DEFAULT_TARGET_QUANTILE,
                 threshold_lr: float = DEFAULT_THRESHOLD_LR) -> None:
        check_adaptive_settings(target_quantile, threshold_lr, None)
        self.target_quantile, self.threshold_lr = target_quantile, threshold_lr
        self._clipper: Clipper | None = None
        #: one row of thresholds per step, the initial ones first
        self._history: list[list[float]] = []
        self._groups: list[str] = []
        #: the released estimate of the fraction within each threshold at the last step
        self.last_fractions: dict[str, float] = {}

    def attach(self, clipper: Clipper) -> None:
        """Start from the clipper's (data-independent) thresholds, or push restored ones into it."""
        if not clipper.count_within:
            raise ValueError("AdaptiveThresholds needs a model made private with "
                             "thresholds='adaptive', whose clipper keeps the counts.")
        self._clipper = clipper
        if self._history:
            _check_same_groups(self._groups, list(clipper.groups))
            self._write(self.thresholds)
        else:
            self._groups = list(clipper.groups)
            self._history = [[clipper.groups[name].threshold for name in self._groups]]

    @property
    def thresholds(self) -> dict[str, float]:
        """The current thresholds; empty until attached to a clipper or restored."""
        return dict(zip(self._groups, self._history[-1])) if self._history else {}

    @property
    def history(self) -> dict[str, list[float]]:
        """Each group's threshold before the first step and after every step since."""
        return {name: [row[k] for row in self._history] for k, name in enumerate(self._groups)}

    def release(
        self,
        *,
        count_noise_multiplier: float,
        expected_batch_size: float,
        generator: torch.Generator | None,
        add_noise: bool = True,
        sum_across_ranks: Callable[[Tensor], Tensor] | None = None,
        secure_mode: bool = False,
    ) -> dict[str, float]:
        """Release this step's noisy counts and move the thresholds; call after the gradient
        noise, once per logical batch. Returns the new thresholds."""
        if self._clipper is None:
            raise RuntimeError("AdaptiveThresholds.release before attach(clipper).")
        device = generator.device if generator is not None else torch.device("cpu")
        released = noisy_counts(
            self._clipper.take_counts(device), count_noise_multiplier=count_noise_multiplier,
            generator=generator, add_noise=add_noise, sum_across_ranks=sum_across_ranks,
            secure_mode=secure_mode,
        ).tolist()
        counts = dict(zip(self._groups, released))
        self.last_fractions = {n: b / expected_batch_size + 0.5 for n, b in counts.items()}
        new = updated_thresholds(
            self.thresholds, counts, expected_batch_size=expected_batch_size,
            target_quantile=self.target_quantile, threshold_lr=self.threshold_lr,
        )
        self._history.append([new[name] for name in self._groups])
        self._write(new)
        return new

    def _write(self, thresholds: Mapping[str, float]) -> None:
        if self._clipper is not None:
            for name, value in thresholds.items():
                self._clipper.groups[name].threshold = value

    def state_dict(self) -> dict[str, Any]:
        return {"groups": list(self._groups),
                "history": torch.tensor(self._history, dtype=torch.float64)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from saved thresholds (applied to the clipper now, or when attached)."""
        groups = list(state["groups"])
        if self._clipper is not None:
            _check_same_groups(groups, list(self._clipper.groups))
        self._groups, self._history = groups, state["history"].tolist()
        self._write(self.thresholds)


def _check_same_groups(saved: list[str], current: list[str]) -> None:
    if saved != current:
        raise ValueError(
            f"The checkpoint holds adaptive thresholds for clipping groups {saved}, but this "
            f"model's groups are {current}; resume with the same model and clipping."
        )
