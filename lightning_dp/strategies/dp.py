"""``Trainer(strategy="dp")``: differentially private training on one device.

At setup the LightningModule is rewritten for per-example clipping; the train dataloader is
rebuilt around Poisson sampling; each logical batch is one noisy step (``private_step.py``).
Validation and testing run the plain model and cost no budget.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import SingleDeviceStrategy
from typing_extensions import override

from lightning_dp.compiling import compile_in_place
from lightning_dp.engine.clip_fns import ClipFn
from lightning_dp.engine.make_private import ThresholdMode
from lightning_dp.rules.norm_method import NormMethod
from lightning_dp.strategies.loss import LossReduction
from lightning_dp.strategies.private_step import PrivateStepMixin
from lightning_dp.strategies.private_training import (
    ClippingStyle,
    PrivacySettings,
    PrivateTraining,
    SpeedSettings,
)
from lightning_dp.thresholds import DEFAULT_TARGET_QUANTILE, DEFAULT_THRESHOLD_LR


class DPStrategy(PrivateStepMixin, SingleDeviceStrategy):
    """DP-SGD on one device: per-example clipping, Poisson sampling, noise once per step.

    Args:
        clipping: ``"layer"`` (default), ``"flat"``, ``"unit"``, or groups of parameter-name
            prefixes (see ``make_private``).
        clip_fn: ``"abadi"`` (hard clipping) or ``"automatic"`` (normalised, Bu et al. 2022).
        max_grad_norm: clipping threshold C, one for all groups or a mapping group -> C.
        gamma: stabiliser of automatic clipping.
        noise_multiplier: sigma in units of the sensitivity; None calibrates it from
            ``PrivacyAccountant(target_epsilon=...)``.
        poisson: Poisson-sample logical batches (what the accountant assumes). False keeps the
            user's batches and accounts every step without amplification (q = 1).
        secure_mode: sampling and noise seeded from OS entropy (refuses a seed), noise drawn as
            sums of float64 normals against floating-point attacks (see README).
        thresholds: ``"fixed"`` (``max_grad_norm``), or ``"adaptive"``: every group's threshold
            follows the ``target_quantile`` of its per-example norms, moved each step by a
            noisy count (``lightning_dp/thresholds.py``) that is charged to the accountant.
        target_quantile: r, the fraction of examples meant to fall within their threshold.
        threshold_lr: eta, the step size of the geometric update C <- C exp(-eta (b/(qN) + 1/2 - r)).
        count_noise_multiplier: sigma_b, the std of each count's Gaussian noise; None spends 5%
            of the privacy budget on the counts (sigma_b = sigma_eff sqrt(K / 0.2)).
        initial_threshold: the data-independent starting thresholds (one float, or per group);
            None starts from ``max_grad_norm``.
        seed: seed of the sampling and noise streams; None draws it from torch's global RNG
            (reproducible under ``seed_everything``).
        max_physical_batch_size: split each logical batch into micro-batches of at most this
            many examples (memory only; the result is unchanged).
        loss_reduction: how to read a scalar loss from ``training_step``: ``"auto"`` (from the
            autograd graph), ``"sum"`` or ``"mean"``. Per-example losses (shape [B]) need none.
        norm_method: per-layer norm algorithm (speed only).
        fallback: handle modules without a rule with the torch.func fallback.
        compile: ``torch.compile`` the LightningModule's forward with the DP graph pass
            (``lightning_dp.compile``); micro-batches are padded to ``max_physical_batch_size``
            (default: a multiple of 8 above the expected batch size) so that Poisson batch
            sizes never recompile, and padding rows are clipped to exactly zero. The first step
            runs eagerly, with the leak guard that compiled graphs cannot carry.
        self_check: before the first step (and after the trainable parameters change), compare
            the engine's per-example group norms on a few examples of the first micro-batch with
            single-example passes of ``training_step`` (dropout off), and refuse to train if
            they differ (``lightning_dp.self_check``). Costs a few extra passes, once.
        device: the device; None takes the accelerator's.
    """

    strategy_name = "dp"

    def __init__(
        self,
        *,
        clipping: ClippingStyle | list[list[str]] | dict[str, list[str]] = "layer",
        clip_fn: ClipFn = "abadi",
        max_grad_norm: float | dict[str, float] = 1.0,
        gamma: float = 0.01,
        noise_multiplier: float | None = None,
        poisson: bool = True,
        secure_mode: bool = False,
        thresholds: ThresholdMode = "fixed",
        target_quantile: float = DEFAULT_TARGET_QUANTILE,
        threshold_lr: float = DEFAULT_THRESHOLD_LR,
        count_noise_multiplier: float | None = None,
        initial_threshold: float | dict[str, float] | None = None,
        seed: int | None = None,
        max_physical_batch_size: int | None = None,
        loss_reduction: LossReduction = "auto",
        norm_method: NormMethod = "auto",
        fallback: bool = False,
        compile: bool = False,
        self_check: bool = True,
        device: str | torch.device | None = None,
        accelerator: Any = None,
        checkpoint_io: Any = None,
        precision_plugin: Any = None,
    ) -> None:
        super().__init__(
            device=device or "cpu", accelerator=accelerator, checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
        )
        self._device_given = device is not None
        self.private = PrivateTraining(
            PrivacySettings(
                clipping, clip_fn, max_grad_norm, gamma, noise_multiplier, poisson, secure_mode,
                thresholds=thresholds, target_quantile=target_quantile, threshold_lr=threshold_lr,
                count_noise_multiplier=count_noise_multiplier, initial_threshold=initial_threshold,
            ),
            SpeedSettings(max_physical_batch_size, norm_method, fallback, compile),
            seed,
            loss_reduction,
            self_check,
        )

    @property
    @override
    def root_device(self) -> torch.device:
        if not self._device_given and self.accelerator is not None:
            kind = type(self.accelerator).__name__
            if kind == "CUDAAccelerator":
                return torch.device("cuda", torch.cuda.current_device())
            if kind == "MPSAccelerator":
                return torch.device("mps")
        return self._root_device

    @override
    def setup(self, trainer: Any) -> None:
        check_trainer_supports_dp(trainer, self)
        self.private.make_private(self.lightning_module)
        super().setup(trainer)

    @override
    def compile_model(self) -> None:
        compile_in_place(self.lightning_module, dynamic=False)


def check_trainer_supports_dp(trainer: Any, strategy: Any) -> None:
    """Refuse Trainer settings that would break the per-step privacy guarantee."""
    if trainer.accumulate_grad_batches != 1:
        raise ValueError(
            f"accumulate_grad_batches={trainer.accumulate_grad_batches}: with lightning-dp the "
            "logical (Poisson) batch is the accumulation unit and gets one noise draw and one "
            "accountant step. Raise the DataLoader's batch_size for larger logical batches and "
            "set the strategy's max_physical_batch_size to bound memory."
        )
    if not strategy.lightning_module.automatic_optimization:
        raise ValueError(
            "lightning-dp supports automatic optimization only: with manual optimization it "
            "cannot guarantee one noise draw per logical batch. Remove "
            "`self.automatic_optimization = False`."
        )
    calibrates = any(getattr(c, "target_epsilon", None) is not None for c in trainer.callbacks)
    if strategy.private.privacy.noise_multiplier is None and not calibrates:
        raise ValueError(
            "lightning-dp: no noise multiplier. Pass noise_multiplier=... to the strategy, or add "
            "lightning_dp.PrivacyAccountant(target_epsilon=...) to the Trainer's callbacks to "
            "calibrate it."
        )
    plugin = strategy.precision_plugin
    if isinstance(plugin, MixedPrecision) and plugin.scaler is not None:
        raise ValueError(
            "precision='16-mixed' scales the loss by a dynamic factor before backward, which "
            "scales every per-example gradient and breaks clipping at the threshold. Use "
            "precision='bf16-mixed' (or 32)."
        )
