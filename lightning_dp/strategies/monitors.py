"""Decisions that read training metrics: outside the guarantee, so said once."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities import rank_zero_warn


def warn_if_monitoring_training_metrics(trainer: Any) -> None:
    """Warn when an LR scheduler or a callback (``ReduceLROnPlateau``, ``EarlyStopping``,
    ``ModelCheckpoint``) monitors a metric that ``training_step`` logs. Such a metric is
    computed from the training data without noise, and what it decides (the learning rate, when
    to stop, which checkpoint is kept) shapes the released model. Call after the first step,
    when ``training_step`` has logged."""
    results = getattr(getattr(trainer.fit_loop, "epoch_loop", None), "_results", None)
    if results is None:  # Lightning's result collection moved: nothing to check against
        return
    logged = {key.split(".", 1)[1] for key in results if key.startswith("training_step.")}
    monitors = [(type(config.scheduler).__name__, config.monitor)
                for config in trainer.lr_scheduler_configs if config.monitor]
    monitors += [(type(callback).__name__, callback.monitor) for callback in trainer.callbacks
                 if isinstance(getattr(callback, "monitor", None), str)]
    hits = [f"{who} monitors {name!r}" for who, name in monitors
            if name in logged or name.removesuffix("_step") in logged or name.removesuffix("_epoch") in logged]
    if hits:
        rank_zero_warn(
            f"lightning-dp: {'; '.join(hits)}, which training_step logs from the training data "
            "without noise. What it decides (the learning rate, when to stop, which checkpoint "
            "is kept) then depends on that data outside the privacy guarantee. Monitor a "
            "validation metric on data outside the training set instead."
        )
