"""``PrivacyAccountant``: calibrate sigma from a target epsilon, log epsilon, stop at the budget.

The spent budget itself lives in the strategy's ledger and is saved in every checkpoint by the
strategy, so a resumed run (even one restarted after a kill) continues from the epsilon already
spent. This callback is the user-facing side: calibration at train start, epsilon in the logger
and progress bar, per-group clip fractions and thresholds, and a clean stop before the next
step would exceed the target.
"""

from __future__ import annotations

import math
import time
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_dp.accounting import PrivacyLedger, noise_multiplier_for
from lightning_dp.engine import clipper_of
from lightning_dp.strategies.private_training import PrivateTraining


def private_training_of(trainer: pl.Trainer) -> PrivateTraining:
    private = getattr(trainer.strategy, "private", None)
    if not isinstance(private, PrivateTraining):
        raise ValueError(
            f"PrivacyAccountant needs a lightning-dp strategy, but the Trainer uses "
            f"{type(trainer.strategy).__name__}; pass strategy='dp' (or 'dp_fsdp')."
        )
    return private


#: Recomputing epsilon for the progress bar at every step is free below this (seconds).
_CHEAP_SECONDS = 0.02
#: Lightning's ``max_epochs`` when neither it nor ``max_steps`` is given.
_LIGHTNING_DEFAULT_MAX_EPOCHS = 1000


def _steps_left(trainer: pl.Trainer) -> float:
    """Steps this fit still runs from the start of the current epoch, at the current loader's
    length (``estimated_stepping_batches`` counts every epoch at that length)."""
    left = math.inf
    if trainer.max_steps != -1:
        left = trainer.max_steps - trainer.global_step
    if trainer.max_epochs is not None and trainer.max_epochs != -1:
        left = min(left, (trainer.max_epochs - trainer.current_epoch) * trainer.num_training_batches)
    return max(left, 0)


class PrivacyAccountant(Callback):
    """Account for every DP-SGD step and keep epsilon within the target.

    Args:
        target_epsilon: the budget; when the strategy's ``noise_multiplier`` is None, sigma is
            calibrated at train start as the smallest one that meets it over the planned steps
            (``max_steps``, or ``max_epochs`` x steps per epoch). None only reports epsilon.
            With ``thresholds="adaptive"`` the calibrated sigma is sigma_eff of the gradient
            and the K threshold counts released together; the strategy raises the gradient's
            sigma so that the joint release costs exactly sigma_eff (see DPStrategy).
        delta: the delta of (epsilon, delta)-DP; default ``1 / (10 N)``, well below 1/N.
        accountant: ``"pld"`` (tight) or ``"rdp"`` (faster, looser).
        log_every_n_steps: epsilon is recomputed at least this often (default: the Trainer's),
            at every step while that is cheap (under 20 ms, or 5% of the time since the last
            recompute), and at the last planned step.
        log_clip_fraction: also log ``dp/clip_fraction/<group>``, the raw fraction of the last
            micro-batch's examples whose norm exceeded the threshold. It is computed from the
            data without noise, so logs that hold it are NOT covered by the DP guarantee: a
            tuning diagnostic, off by default. Thresholds (public, or moved only by noisy
            counts) and the noisy ``dp/within_fraction/<group>`` of adaptive thresholds are
            always logged.

    The neighbouring relation is add/remove of one training example.
    """

    def __init__(
        self,
        target_epsilon: float | None = None,
        delta: float | None = None,
        accountant: Literal["pld", "rdp"] = "pld",
        log_every_n_steps: int | None = None,
        log_clip_fraction: bool = False,
    ) -> None:
        if target_epsilon is not None and not (math.isfinite(target_epsilon) and target_epsilon > 0):
            raise ValueError(f"PrivacyAccountant: target_epsilon={target_epsilon!r} must be positive and finite.")
        if delta is not None and not 0 < delta < 1:
            raise ValueError(f"PrivacyAccountant: delta={delta!r} must lie in (0, 1); pick one well below 1/N.")
        if accountant not in ("pld", "rdp"):
            raise ValueError(f"PrivacyAccountant: accountant={accountant!r} is not 'pld' or 'rdp'.")
        self.target_epsilon = target_epsilon
        self.delta = delta
        self.accountant = accountant
        self.log_every_n_steps = log_every_n_steps
        self._planned = 0
        #: (N, q) the step limit was planned for; a reloaded dataloader may change them
        self._planned_rate: tuple[int, float] = (0, 0.0)
        self._refresh_seconds, self._last_refresh_end = 0.0, time.perf_counter()
        self.log_clip_fraction = log_clip_fraction
        self.epsilon: float = 0.0

    # -- start ---------------------------------------------------------------------------
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        private = private_training_of(trainer)
        n = private.num_samples
        if self.delta is None:
            self.delta = 1.0 / (10 * n)
        if self.delta >= 1.0 / n:
            raise ValueError(
                f"PrivacyAccountant: delta={self.delta!r} is not below 1/N = {1 / n:.3g} for N={n} "
                "training examples; such a delta allows releasing whole examples. Use e.g. "
                f"delta={1 / (10 * n):.1g}."
            )
        private.delta = self.delta  # the delta a refusal to retrain the model reports epsilon at
        self._use_accountant(private, n)
        q = private.accounted_sample_rate
        planned = trainer.estimated_stepping_batches
        if private.privacy.noise_multiplier is None:
            if self.target_epsilon is None:
                raise ValueError(
                    "lightning-dp: no noise multiplier. Pass noise_multiplier to the strategy, or "
                    "target_epsilon to PrivacyAccountant so it can be calibrated."
                )
            if not math.isfinite(planned):
                raise ValueError(
                    "PrivacyAccountant: calibrating sigma from target_epsilon needs a planned "
                    "number of steps; set max_epochs or max_steps on the Trainer."
                )
            # sigma_eff of the whole per-step release; the strategy splits it between the
            # gradient and any adaptive-threshold counts
            private.calibrate(noise_multiplier_for(
                target_epsilon=self.target_epsilon, delta=self.delta, sample_rate=q,
                steps=int(planned), accountant=self.accountant,
            ))
        sigma = private.effective_noise_multiplier
        if self.target_epsilon is not None:
            private.max_steps = self._max_steps(private.ledger, sigma, q, int(min(planned, 10**9)))
        self.epsilon = private.ledger.epsilon(self.delta)
        counts = (f" (gradient sigma={private.privacy.noise_multiplier:.4g} with {private.num_counts} "
                  f"threshold counts at sigma_b={private.count_noise_multiplier:.4g})"
                  if private.num_counts else "")
        rank_zero_info(
            f"lightning-dp: sigma={sigma:.4g}{counts}, q={q:.4g} (expected batch {private.expected_batch_size:.1f} "
            f"of N={n}), planned steps={planned}, delta={self.delta:.3g}, accountant={self.accountant}"
            + (f", target epsilon={self.target_epsilon}" if self.target_epsilon else "")
            + (f", resuming at step {private.ledger.steps} (epsilon {self.epsilon:.4g})" if private.ledger.steps else "")
        )
        if trainer.max_steps == -1 and trainer.max_epochs == _LIGHTNING_DEFAULT_MAX_EPOCHS:
            rank_zero_warn(
                f"lightning-dp: the Trainer sets neither max_epochs nor max_steps, so the plan is "
                f"Lightning's default of {_LIGHTNING_DEFAULT_MAX_EPOCHS} epochs ({planned} steps), "
                f"and the privacy budget is spread over all of them: sigma={sigma:.4g}. Set "
                "max_epochs or max_steps to the training you mean (fewer steps: less noise each)."
            )
        self._planned = int(min(planned, 10**9))
        self._planned_rate = (n, q)
        if private.max_steps is not None and private.ledger.steps >= private.max_steps:
            if private.ledger.steps:
                rank_zero_info("lightning-dp: the privacy budget is already spent; not training.")
            else:
                rank_zero_warn(
                    f"lightning-dp: a single step at sigma={sigma:.4g} and q={q:.4g} already exceeds "
                    f"target epsilon {self.target_epsilon}; not training. Raise noise_multiplier or "
                    "target_epsilon, or pass noise_multiplier=None to calibrate it for the plan."
                )
            trainer.should_stop = True

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Plan again when a reloaded train dataloader (``reload_dataloaders_every_n_epochs``)
        changed N and so q: the step limit was the count of steps at the old q that fit the
        target, and a dataset that shrank 64 -> 16 ran on to epsilon 3.77 against a target of 2."""
        private = private_training_of(trainer)
        rate = (private.num_samples, private.accounted_sample_rate)
        if rate == self._planned_rate:
            return
        (n, q), (old_n, old_q) = rate, self._planned_rate
        self._planned_rate = rate
        if self.delta >= 1.0 / n:
            rank_zero_warn(
                f"lightning-dp: the reloaded train dataset has N={n} examples (was {old_n}), and "
                f"delta={self.delta:.3g} is no longer below 1/N = {1 / n:.3g}; such a delta allows "
                "releasing whole examples. Pass PrivacyAccountant(delta=...) well below 1/N of the "
                "largest dataset the run will see."
            )
        left = _steps_left(trainer)
        if math.isfinite(left):
            self._planned = private.ledger.steps + int(min(left, 10**9))
        if self.target_epsilon is None:
            return
        private.max_steps = self._max_steps(private.ledger, private.effective_noise_multiplier, q, self._planned)
        rank_zero_info(
            f"lightning-dp: the train dataset changed from N={old_n} (q={old_q:.4g}) to N={n} "
            f"(q={q:.4g}); at most {private.max_steps} steps in all fit target epsilon "
            f"{self.target_epsilon} ({private.ledger.steps} spent, {self._planned} planned)."
        )
        if private.ledger.steps >= private.max_steps:
            rank_zero_info("lightning-dp: the privacy budget is spent at the new sample rate; stopping.")
            trainer.should_stop = True

    def _use_accountant(self, private: PrivateTraining, num_samples: int) -> None:
        """Rebuild the strategy's ledger with this callback's accountant, keeping its history."""
        ledger = PrivacyLedger(accountant=self.accountant, num_samples=num_samples)
        state = private.ledger.state_dict()
        state["accountant"] = self.accountant
        ledger.load_state_dict(state)
        private.ledger = ledger

    def _max_steps(self, ledger: PrivacyLedger, sigma: float, q: float, planned: int) -> int:
        """The most steps in all (the ledger's, then more at sigma and q) whose epsilon stays
        within the target: at least the planned ones when sigma was calibrated for them. Steps
        already spent count at their own sigma and q (a second fit may sample at another rate)."""
        spent = ledger.steps

        def eps(steps: int) -> float:
            return ledger.epsilon_after(self.delta, noise_multiplier=sigma, sample_rate=q, steps=steps - spent)

        if sigma == 0 or eps(spent) > self.target_epsilon:
            return spent
        if eps(planned) <= self.target_epsilon:
            return planned
        lo, hi = spent, planned  # eps(lo) <= target < eps(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if eps(mid) <= self.target_epsilon else (lo, mid)
        return lo

    # -- every step ----------------------------------------------------------------------
    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        private = private_training_of(trainer)
        steps = private.ledger.steps
        stop = private.max_steps is not None and steps >= private.max_steps
        every = self.log_every_n_steps or trainer.log_every_n_steps
        last = steps >= self._planned
        if stop or last or steps % every == 0 or steps == 1 or self._cheap_to_refresh():
            started = time.perf_counter()
            self.epsilon = private.ledger.epsilon(self.delta)
            self._last_refresh_end = time.perf_counter()
            self._refresh_seconds = self._last_refresh_end - started
        pl_module.log("epsilon", self.epsilon, prog_bar=True, on_step=True, on_epoch=False)
        pl_module.log("dp/sigma", float(private.privacy.noise_multiplier), on_step=True, on_epoch=False)
        if private.adaptive is not None:
            pl_module.log("dp/sigma_eff", float(private.effective_noise_multiplier), on_step=True, on_epoch=False)
            for name, fraction in private.adaptive.last_fractions.items():
                # the released (noisy) estimate: safe to log, unlike a raw count
                pl_module.log(f"dp/within_fraction/{name}", fraction, on_step=True, on_epoch=False)
        clipper = clipper_of(pl_module)
        for name, stats in clipper.stats.items():
            if self.log_clip_fraction:
                batch_size = max(int(stats.norms.numel()), 1)
                pl_module.log(f"dp/clip_fraction/{name}", float(stats.clipped) / batch_size, on_step=True, on_epoch=False)
            pl_module.log(f"dp/threshold/{name}", clipper.groups[name].threshold, on_step=True, on_epoch=False)
        if stop and not trainer.should_stop:
            spent = f"epsilon {self.epsilon:.4f} of the target {self.target_epsilon} at delta {self.delta:.3g}"
            if steps >= self._planned:
                rank_zero_info(f"lightning-dp: privacy plan complete after step {steps}: {spent}.")
            else:
                rank_zero_info(
                    f"lightning-dp: stopping after step {steps} of the {self._planned} planned: one "
                    f"more step would exceed the budget ({spent}): the noise multiplier in use was "
                    "not calibrated for this plan."
                )
            trainer.should_stop = True

    def _cheap_to_refresh(self) -> bool:
        """Recompute epsilon (for the progress bar) while that costs under 20 ms, or 5% of the
        time since the last recompute: a slow PLD answer is refreshed less often, never left
        stale for a whole run of short steps (it used to wait for ``log_every_n_steps``)."""
        since = time.perf_counter() - self._last_refresh_end
        return self._refresh_seconds < max(_CHEAP_SECONDS, 0.05 * since)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epsilon = private_training_of(trainer).ledger.epsilon(self.delta)

    # -- checkpoints ---------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"target_epsilon": self.target_epsilon, "delta": self.delta, "accountant": self.accountant,
                "epsilon": self.epsilon}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.delta = state_dict["delta"] if self.delta is None else self.delta
        self.epsilon = state_dict["epsilon"]
