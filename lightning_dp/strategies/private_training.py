"""The DP training step shared by the ``dp`` and ``dp_fsdp`` strategies.

One logical (Poisson) batch is one step: it is split into physical micro-batches of at most
``max_physical_batch_size`` examples, each run forward and backward (the engine accumulates
clipped per-example sums in ``.grad``), then noise is drawn once and the sum divided by the
expected batch size q*N, and the optimizer steps once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils._pytree import tree_flatten, tree_map

from lightning_dp.accounting import (
    PrivacyLedger,
    count_noise_multiplier_for,
    effective_noise_multiplier,
    gradient_noise_multiplier_for,
)
from lightning_dp.accounting.adaptive import DEFAULT_COUNT_BUDGET_SHARE
from lightning_dp.data import PoissonBatchSampler
from lightning_dp.engine import (
    PrivacyLeakError,
    clipper_of,
    group_thresholds,
    is_private,
    make_private,
    planned_parameters,
    sensitivity,
    strip_private,
)
from lightning_dp.engine.clip_fns import ClipFn
from lightning_dp.engine.make_private import ThresholdMode
from lightning_dp.noise import add_noise_and_normalize, make_noise_generator
from lightning_dp.rules.norm_method import NormMethod
from lightning_dp.strategies.buffers import ChangedBuffers
from lightning_dp.strategies.loss import LossReduction
from lightning_dp.strategies.ownership import claim
from lightning_dp.thresholds import (
    DEFAULT_TARGET_QUANTILE,
    DEFAULT_THRESHOLD_LR,
    AdaptiveThresholds,
    check_adaptive_settings,
)

ClippingStyle = Literal["flat", "layer", "unit"]


@dataclass
class PrivacySettings:
    """What changes the privacy guarantee (goes into the privacy card)."""

    clipping: ClippingStyle | list[list[str]] | dict[str, list[str]] = "layer"
    clip_fn: ClipFn = "abadi"
    max_grad_norm: float | dict[str, float] = 1.0
    gamma: float = 0.01
    noise_multiplier: float | None = None
    poisson: bool = True
    secure_mode: bool = False
    thresholds: ThresholdMode = "fixed"
    target_quantile: float = DEFAULT_TARGET_QUANTILE
    threshold_lr: float = DEFAULT_THRESHOLD_LR
    count_noise_multiplier: float | None = None
    initial_threshold: float | dict[str, float] | None = None


@dataclass
class SpeedSettings:
    """What only changes speed and memory, never the result."""

    max_physical_batch_size: int | None = None
    norm_method: NormMethod = "auto"
    fallback: bool = False
    #: torch.compile the model with the DP graph pass; micro-batches are then padded to one
    #: shape (``max_physical_batch_size``) so Poisson batch sizes never recompile.
    compile: bool = False


def batch_size_of(batch: Any) -> int:
    """Examples in a collated batch: the size of dim 0 of its first tensor."""
    for leaf in tree_flatten(batch)[0]:
        if isinstance(leaf, Tensor) and leaf.dim() > 0:
            return leaf.shape[0]
    raise ValueError(
        f"lightning-dp found no tensor with a batch dimension in the training batch "
        f"({type(batch).__name__}); batches must hold tensors whose dim 0 indexes examples."
    )


def split_batch(batch: Any, size: int | None) -> list[Any]:
    """Micro-batches of at most ``size`` examples (slices along dim 0 of every tensor)."""
    total = batch_size_of(batch)
    if size is None or total <= size:
        return [batch]
    return [
        tree_map(lambda t: t[start : start + size] if isinstance(t, Tensor) and t.dim() > 0 else t, batch)
        for start in range(0, total, size)
    ]


class PrivateTraining:
    """Owns the privacy engine of one training run: model rewrite, sampler, noise."""

    def __init__(
        self,
        privacy: PrivacySettings,
        speed: SpeedSettings,
        seed: int | None,
        loss_reduction: LossReduction,
        self_check: bool = True,
    ) -> None:
        if privacy.noise_multiplier is not None and not (
            math.isfinite(privacy.noise_multiplier) and privacy.noise_multiplier >= 0
        ):
            raise ValueError(
                f"noise_multiplier={privacy.noise_multiplier!r}: it must be a finite number >= 0, "
                "or None to calibrate it from PrivacyAccountant(target_epsilon=...)."
            )
        size = speed.max_physical_batch_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"max_physical_batch_size={size!r}: it must be an int >= 1 or None.")
        if privacy.secure_mode and seed is not None:
            raise ValueError(
                f"seed={seed!r} with secure_mode=True: secure mode draws sampling and noise from "
                "OS entropy, and a known seed would make them reproducible. Drop the seed."
            )
        if privacy.noise_multiplier == 0:
            rank_zero_warn(
                "lightning-dp: noise_multiplier=0 adds no noise, so this training is NOT "
                "differentially private (epsilon is infinite; clipping alone protects no example). "
                "Use it only to debug; pass noise_multiplier > 0, or None with "
                "PrivacyAccountant(target_epsilon=...)."
            )
        self.privacy, self.speed, self.seed, self.loss_reduction = privacy, speed, seed, loss_reduction
        #: the noise multiplier passed in (None: calibrated), to tell a resume that ignores it
        self.requested_noise_multiplier = privacy.noise_multiplier
        #: the delta epsilon is reported at (set by PrivacyAccountant)
        self.delta: float | None = None
        self.self_check = self_check
        #: run ``lightning_dp.self_check`` on the next non-empty micro-batch (before it trains)
        self.pending_self_check = self_check
        #: the adaptive thresholds' state (None with fixed thresholds)
        self.adaptive = _adaptive_thresholds(privacy)
        #: buffers that change between steps are released without noise: warned about
        self.changed_buffers = ChangedBuffers()
        #: every parameter any plan of this run clipped and noised (the privacy card's), and
        #: the thresholds of the plan in force
        self.trained: set[str] = set()
        self.thresholds_in_force: dict[str, float] = {}
        self.sampler: PoissonBatchSampler | None = None
        self.num_samples: int | None = None
        self.sample_rate: float | None = None
        self.generator: torch.Generator | None = None
        self.ledger = PrivacyLedger(accountant="rdp")
        #: Set by PrivacyAccountant: the last step that keeps epsilon within the target.
        self.max_steps: int | None = None
        self._pending_state: Mapping[str, Any] | None = None

    # -- model ---------------------------------------------------------------------------
    def make_private(self, module: nn.Module) -> None:
        p = self.privacy
        if not is_private(module):
            initial = p.initial_threshold if p.initial_threshold is not None else p.max_grad_norm
            make_private(
                module, clipping=p.clipping, clip_fn=p.clip_fn, max_grad_norm=initial,
                gamma=p.gamma, norm_method=self.speed.norm_method, fallback=self.speed.fallback,
                thresholds=p.thresholds,
            )
            # the strategy re-plans before each step and refuses stray gradients before noise
            clipper_of(module).plan_check = None
        if self.adaptive is not None:
            self.adaptive.attach(clipper_of(module))
        self.trained.update(planned_parameters(module))
        self.thresholds_in_force = group_thresholds(module)

    def follow_trainable_parameters(self, module: nn.Module) -> None:
        """Re-plan the clipping groups when parameters were frozen or unfrozen since setup
        (``BackboneFinetuning``, a manual ``requires_grad_``): a newly trainable parameter joins
        a clipping group (and the sensitivity) before it can receive a gradient."""
        planned = {id(p) for p in planned_parameters(module).values()}
        if planned == {id(p) for p in module.parameters() if p.requires_grad}:
            return
        if self.speed.compile or self.adaptive is not None:
            raise ValueError(
                "lightning-dp: the set of trainable parameters changed after setup, which "
                f"{'compile=True' if self.speed.compile else 'adaptive thresholds'} cannot follow "
                "(its graphs and per-group thresholds were built for the old groups). Freeze or "
                "unfreeze before fit, or train with compile=False and thresholds='fixed'."
            )
        old = clipper_of(module)
        strip_private(module)
        self.make_private(module)
        new = clipper_of(module)
        new.require_prompt_finish = old.require_prompt_finish
        self.pending_self_check = self.self_check
        rank_zero_info(
            f"lightning-dp: trainable parameters changed; clipping groups re-planned "
            f"({len(new.groups)} groups, sensitivity {sensitivity(module):.4g})."
        )

    def refuse_unclipped_gradients(self, module: nn.Module, optimizer: Optimizer) -> None:
        """Before noise and the optimizer step: every parameter holding a gradient must be one
        the clipper wrote. A parameter outside the plan, or one the optimizer steps that is not
        the module's at all (kept in a Python list or dict), would be released unclipped and
        without noise."""
        planned = {id(p) for p in planned_parameters(module).values()}
        stray = [n for n, p in module.named_parameters() if p.grad is not None and id(p) not in planned]
        if stray:
            raise PrivacyLeakError(
                f"lightning-dp: parameters {stray} hold gradients but are in no clipping group "
                "(they became trainable after the step began, or their .grad was written by "
                "hand); releasing them would not be private. Nothing was released. Change "
                "requires_grad between steps (e.g. in on_train_epoch_start), not inside "
                "training_step."
            )
        outside = _outside_parameters(planned, optimizer)
        if outside:
            raise PrivacyLeakError(
                f"lightning-dp: the optimizer steps parameters that are not parameters of the "
                f"{type(module).__name__} and hold gradients ({', '.join(outside)}): no clipping "
                "group covers them and no noise is added to them, so releasing them would not be "
                "private. Nothing was released. Register them on the module (submodules as "
                "attributes or in nn.ModuleList/nn.ModuleDict rather than a Python list or dict, "
                "tensors as nn.Parameter attributes), or leave them out of configure_optimizers."
            )

    def claim(self, module: nn.Module) -> None:
        """Mark ``module`` as trained by this run; refused if another run already spent privacy
        on it, unless this run resumed a checkpoint (``ownership.py``)."""
        claim(self, module, resumed=self._pending_state is not None)

    # -- data ----------------------------------------------------------------------------
    def make_sampler(self, num_samples: int, sample_rate: float, rank: int, world_size: int) -> PoissonBatchSampler:
        """This run's Poisson sampler. A rebuilt one (``reload_dataloaders_every_n_epochs``, a
        second ``fit``) continues the run's stream after the batches trained on, and the first
        one of a resumed run continues the checkpoint's: restarting a seeded stream would train
        on the same batches again while the ledger charges independent ones."""
        previous = self.sampler
        seed = self.seed if self.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
        if self.privacy.secure_mode:
            seed = None
        self.sampler = PoissonBatchSampler(
            num_samples, sample_rate, generator=seed, rank=rank, world_size=world_size,
            secure_mode=self.privacy.secure_mode,
        )
        self.num_samples, self.sample_rate = num_samples, sample_rate
        if previous is not None:
            self.sampler.load_state_dict(self._continued_stream(previous))
        elif self._pending_state is not None and self._pending_state.get("sampler") is not None:
            saved = self._pending_state["sampler"]
            _refuse_other_data(saved, num_samples, sample_rate)
            self.sampler.load_state_dict(saved)
        return self.sampler

    def _continued_stream(self, previous: PoissonBatchSampler) -> dict[str, Any]:
        """The previous sampler's stream, just after the batches trained on (one per ledger
        step; batches a loader prefetched beyond them are drawn again), for the new sampler."""
        try:
            state = previous.state_dict(consumed=self.ledger.steps)
        except ValueError:  # steps not drawn from this stream: continue after all it drew
            state = previous.state_dict()
        new = self.sampler.state_dict()
        if any(state[key] != new[key] for key in ("num_samples", "sample_rate", "rank", "world_size")):
            # a different dataset or rank layout: same seed, next stream index, a fresh pass
            state = {**new, "seed": state["seed"], "next_batch": state["next_batch"], "position": 0}
        return state

    @property
    def expected_batch_size(self) -> float:
        return self.sample_rate * self.num_samples

    def fix_physical_batch_size(self, world_size: int = 1) -> None:
        """Under compile, pick one micro-batch shape if the user gave none: a multiple of 8
        that this rank's Poisson batch exceeds rarely (mean + 4 standard deviations), so most
        logical batches run as one padded micro-batch."""
        if self.speed.compile and self.speed.max_physical_batch_size is None:
            q, n = self.sample_rate, self.num_samples / world_size
            rare = q * n + 4 * math.sqrt(q * (1 - q) * n)
            self.speed.max_physical_batch_size = max(8, 8 * math.ceil(rare / 8))

    # -- noise ---------------------------------------------------------------------------
    def noise_generator(self, rank: int, device: torch.device) -> torch.Generator:
        if self.generator is None:
            if self.privacy.secure_mode:
                self.generator = make_noise_generator(None, rank=rank, device=device, secure_mode=True)
            else:
                seed = self.seed if self.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
                self.generator = make_noise_generator(seed, rank=rank, device=device)
            pending = self._pending_state or {}
            if pending.get("noise_generator") is not None and not self.privacy.secure_mode:
                self.generator.set_state(pending["noise_generator"])
        return self.generator

    # -- noise multipliers ----------------------------------------------------------------
    @property
    def num_counts(self) -> int:
        """K, the noisy counts released per step (one per group with adaptive thresholds)."""
        if self.adaptive is None:
            return 0
        if not self.adaptive.thresholds:
            raise RuntimeError("lightning-dp: the number of clipping groups is known only once "
                               "the model is made private (at the strategy's setup).")
        return len(self.adaptive.thresholds)

    @property
    def count_noise_multiplier(self) -> float | None:
        """sigma_b of the counts; by default they spend DEFAULT_COUNT_BUDGET_SHARE of the
        budget, i.e. sigma_b = count_noise_multiplier_for(sigma * sqrt(1 - share), K)."""
        p = self.privacy
        if self.adaptive is None or p.count_noise_multiplier is not None:
            return p.count_noise_multiplier
        if p.noise_multiplier is None:
            return None
        share = DEFAULT_COUNT_BUDGET_SHARE
        return count_noise_multiplier_for(p.noise_multiplier * math.sqrt(1 - share), self.num_counts, share)

    @property
    def effective_noise_multiplier(self) -> float:
        """sigma_eff charged per step: the gradient's sigma, joined with the counts if any."""
        sigma = self.privacy.noise_multiplier
        if self.adaptive is None or sigma is None:
            return sigma
        return effective_noise_multiplier(sigma, self.count_noise_multiplier, self.num_counts)

    def calibrate(self, effective_noise_multiplier: float) -> None:
        """Set the noise from a calibrated sigma_eff: with adaptive thresholds the counts take
        their share (sigma_b) and the gradient's sigma is raised so the joint release costs
        exactly sigma_eff."""
        p = self.privacy
        if self.adaptive is None:
            p.noise_multiplier = effective_noise_multiplier
            return
        k = self.num_counts
        sigma_b = p.count_noise_multiplier
        if sigma_b is None:
            sigma_b = count_noise_multiplier_for(effective_noise_multiplier, k)
        p.noise_multiplier = gradient_noise_multiplier_for(effective_noise_multiplier, sigma_b, k)
        p.count_noise_multiplier = sigma_b

    def noise_and_normalize(
        self,
        module: nn.Module,
        rank: int,
        device: torch.device,
        sum_across_ranks: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        """Release one step: noise once, divide by q*N, then (adaptive) the noisy counts move
        the thresholds; charge the ledger for both. ``sum_across_ranks`` sums the ranks' counts
        under data parallelism; rank 0 alone adds their noise."""
        if self.max_steps is not None and self.ledger.steps >= self.max_steps:
            raise RuntimeError(
                f"lightning-dp: step {self.ledger.steps + 1} would exceed the privacy budget "
                f"(at most {self.max_steps} steps fit the target epsilon); training should have "
                "stopped. Lower max_steps/max_epochs or raise the target epsilon."
            )
        sigma = self.privacy.noise_multiplier
        if sigma is None:
            raise RuntimeError(
                "lightning-dp: no noise multiplier is set. Pass noise_multiplier to the strategy, "
                "or add lightning_dp.PrivacyAccountant(target_epsilon=...) to calibrate it."
            )
        generator = self.noise_generator(rank, device)
        add_noise_and_normalize(
            # frozen after the backward (e.g. in on_after_backward) but holding a clipped
            # gradient: the optimizer still steps it, so it is released and needs noise
            [p for p in module.parameters() if p.requires_grad or p.grad is not None],
            noise_multiplier=sigma,
            sensitivity=sensitivity(module),  # the thresholds that clipped this step
            expected_batch_size=self.expected_batch_size,
            generator=generator,
            secure_mode=self.privacy.secure_mode,
        )
        if self.adaptive is not None:
            self.adaptive.release(
                count_noise_multiplier=self.count_noise_multiplier,
                expected_batch_size=self.expected_batch_size, generator=generator,
                add_noise=rank == 0, sum_across_ranks=sum_across_ranks,
                secure_mode=self.privacy.secure_mode,
            )
        self.ledger.step(noise_multiplier=sigma, sample_rate=self.accounted_sample_rate,
                         count_noise_multiplier=self.count_noise_multiplier, num_groups=self.num_counts)

    @property
    def accounted_sample_rate(self) -> float:
        """q for the accountant: without Poisson sampling no amplification is claimed (q = 1)."""
        return self.sample_rate if self.privacy.poisson else 1.0

    # -- checkpoint ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "noise_multiplier": self.privacy.noise_multiplier,
            "count_noise_multiplier": self.privacy.count_noise_multiplier,
            "thresholds": self.adaptive.state_dict() if self.adaptive is not None else None,
            "trained_parameters": sorted(self.trained),
            "thresholds_in_force": dict(self.thresholds_in_force),
            "ledger": self.ledger.state_dict(),
            # every logical batch trained on is one ledger step; batches prefetched beyond it
            # are drawn again after a resume
            "sampler": self.sampler.state_dict(consumed=self.ledger.steps) if self.sampler is not None else None,
            "noise_generator": (
                self.generator.get_state() if self.generator is not None and not self.privacy.secure_mode else None
            ),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore; sampler and noise streams are applied when they are (re)built."""
        requested, saved_sigma = self.requested_noise_multiplier, state["noise_multiplier"]
        if requested is not None and requested != saved_sigma:
            rank_zero_warn(
                f"lightning-dp: noise_multiplier={requested!r} is ignored on resume; the run "
                f"continues with the checkpoint's noise_multiplier={saved_sigma!r}, the one its "
                "ledger was charged with. To train with another noise multiplier, start a new run "
                "from the weights (load them into the model, no ckpt_path)."
            )
        self.privacy.noise_multiplier = saved_sigma
        saved = state.get("thresholds")
        if (saved is None) != (self.adaptive is None):
            raise ValueError(
                f"The checkpoint was trained with thresholds={'fixed' if saved is None else 'adaptive'!r}"
                f" but this run has thresholds={self.privacy.thresholds!r}; resume with the same "
                "setting, or the thresholds (and the privacy accounting) would not continue."
            )
        if self.adaptive is not None:
            self.privacy.count_noise_multiplier = state["count_noise_multiplier"]
            self.adaptive.load_state_dict(saved)
        self.ledger.load_state_dict(state["ledger"])
        self.trained.update(state.get("trained_parameters", ()))  # older checkpoints lack it
        self._pending_state = state
        if self.sampler is not None and state.get("sampler") is not None:
            self.sampler.load_state_dict(state["sampler"])
        if self.generator is not None and state.get("noise_generator") is not None:
            self.generator.set_state(state["noise_generator"])


def _adaptive_thresholds(privacy: PrivacySettings) -> AdaptiveThresholds | None:
    """Validate the threshold settings; the adaptive state when thresholds='adaptive'."""
    p = privacy
    if p.thresholds == "adaptive":
        check_adaptive_settings(p.target_quantile, p.threshold_lr, p.count_noise_multiplier)
        return AdaptiveThresholds(target_quantile=p.target_quantile, threshold_lr=p.threshold_lr)
    if p.thresholds != "fixed":
        raise ValueError(f"thresholds={p.thresholds!r} is not 'fixed' or 'adaptive'.")
    unused = {
        name: value for name, value, default in [
            ("target_quantile", p.target_quantile, DEFAULT_TARGET_QUANTILE),
            ("threshold_lr", p.threshold_lr, DEFAULT_THRESHOLD_LR),
            ("count_noise_multiplier", p.count_noise_multiplier, None),
            ("initial_threshold", p.initial_threshold, None),
        ] if value != default
    }
    if unused:
        raise ValueError(
            f"{unused} only apply to adaptive thresholds, but thresholds='fixed'; pass "
            "thresholds='adaptive' to use them, or drop them (fixed thresholds are max_grad_norm)."
        )
    return None


def _outside_parameters(planned: set[int], optimizer: Optimizer) -> list[str]:
    """The optimizer's parameters that hold a gradient the clipper did not write, as
    "param_groups[i]['params'][j] (shape)": once the module's own strays are refused, those are
    not the module's (they have no name in it)."""
    return [
        f"param_groups[{i}]['params'][{j}] of shape {list(p.shape)}"
        for i, group in enumerate(optimizer.param_groups)
        for j, p in enumerate(group["params"])
        if p.grad is not None and id(p) not in planned
    ]


def _refuse_other_data(saved: Mapping[str, Any], num_samples: int, sample_rate: float) -> None:
    """A resumed run samples the checkpoint's dataset at its rate: its stream and ledger continue
    with them (the sampler would refuse too, in its own terms)."""
    if (saved.get("num_samples"), saved.get("sample_rate")) == (num_samples, sample_rate):
        return
    n, q = saved.get("num_samples"), saved.get("sample_rate")
    raise ValueError(
        f"lightning-dp: the checkpoint was trained on N={n} examples with an expected batch of "
        f"{q * n:g} (DataLoader batch_size, q={q:.4g}); this run has N={num_samples} and "
        f"{sample_rate * num_samples:g} (q={sample_rate:.4g}). A resumed run continues the "
        "checkpoint's sampling stream and privacy ledger, which hold only for the same data and "
        "batch size: resume with those, or start a new run from the weights (load the "
        "checkpoint's state_dict into the model and fit without ckpt_path)."
    )
