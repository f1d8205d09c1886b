"""The privacy card: what a released model's (epsilon, delta) guarantee rests on.

A card is a flat JSON-able dict built from the training run's privacy state: the ledger (every
release, replayed by the accountant), the clipping settings and thresholds, and the sampling
rate. It holds only settings that change the guarantee, never speed settings.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.metadata
from collections.abc import Iterable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_dp.accounting import PrivacyLedger
from lightning_dp.callbacks.privacy_accountant import PrivacyAccountant, private_training_of
from lightning_dp.engine import group_thresholds, is_private, make_private, planned_parameters
from lightning_dp.strategies.private_step import CHECKPOINT_KEY
from lightning_dp.strategies.private_training import PrivacySettings

NEIGHBOURING_RELATION = "add/remove one training example"
CARD_FORMAT = "lightning-dp privacy card v1"


def privacy_card(trainer: pl.Trainer, *, delta: float | None = None) -> dict[str, Any]:
    """The card of a live (fitted) Trainer, from its strategy's ledger and model.

    ``delta`` defaults to the one of the Trainer's ``PrivacyAccountant``; the accountant
    (PLD or RDP) is the one the ledger uses.
    """
    private = private_training_of(trainer)
    callback = _accountant_callback(trainer)
    delta = delta if delta is not None else getattr(callback, "delta", None)
    if private.num_samples is None or private.sample_rate is None:
        raise ValueError(
            "privacy_card: the Trainer has not trained (no dataset size or sample rate yet); "
            "call it after trainer.fit(...), or build the card from a checkpoint with "
            "privacy_card_from_checkpoint."
        )
    privacy = private.privacy
    if private.adaptive is not None:  # the sigma_b in force, also when it was a default
        privacy = dataclasses.replace(privacy, count_noise_multiplier=private.count_noise_multiplier)
    return make_card(
        privacy=privacy,
        ledger=private.ledger,
        delta=_required_delta(delta),
        num_samples=private.num_samples,
        sample_rate=private.accounted_sample_rate,
        thresholds=group_thresholds(trainer.lightning_module),
        trained=_trained(trainer.lightning_module, private.trained),
    )


def privacy_card_from_checkpoint(
    checkpoint: Mapping[str, Any],
    model: nn.Module,
    privacy: PrivacySettings,
    *,
    delta: float | None = None,
) -> dict[str, Any]:
    """The card of a run saved by a lightning-dp strategy, without training again.

    The ledger, sigma and sampling rate come from the checkpoint; the accountant and delta from
    the saved ``PrivacyAccountant`` state (``delta`` overrides it); the clipping groups and
    thresholds from ``privacy`` applied to a copy of ``model``, exactly as the strategy did.
    """
    saved = checkpoint.get(CHECKPOINT_KEY)
    if saved is None:
        raise ValueError(
            f"The checkpoint has no {CHECKPOINT_KEY!r} entry, so it was not trained with a "
            "lightning-dp strategy and carries no privacy guarantee; train with strategy='dp'."
        )
    state = saved["ranks"][0]
    accountant_state = _saved_accountant_state(checkpoint)
    ledger = PrivacyLedger(accountant=accountant_state.get("accountant", "pld"))
    ledger.load_state_dict(state["ledger"])
    sampler = state.get("sampler")
    if sampler is None:  # poisson=False: no sampler, every step accounted at q = 1
        steps = [e for e in ledger.history if e.kind == "step"]
        num_samples, sample_rate = None, steps[-1].sample_rate if steps else 1.0
    else:
        num_samples, sample_rate = sampler["num_samples"], sampler["sample_rate"]
    privacy = copy.copy(privacy)
    privacy.noise_multiplier = state["noise_multiplier"]
    privacy.count_noise_multiplier = state.get("count_noise_multiplier", privacy.count_noise_multiplier)
    if "trained_parameters" in state:  # what the run trained and the thresholds in force
        trained, fixed_thresholds = state["trained_parameters"], state["thresholds_in_force"]
    else:  # saved before they were: ``privacy`` applied to ``model`` as its flags are now
        planned = _planned(model, privacy)
        trained, fixed_thresholds = planned_parameters(planned), group_thresholds(planned)
    adaptive = state.get("thresholds")  # adaptive thresholds: the last row of their history
    thresholds = (
        dict(zip(adaptive["groups"], adaptive["history"][-1].tolist())) if adaptive is not None
        else fixed_thresholds
    )
    return make_card(
        privacy=privacy,
        ledger=ledger,
        delta=_required_delta(delta if delta is not None else accountant_state.get("delta")),
        num_samples=num_samples,
        sample_rate=sample_rate if privacy.poisson else 1.0,
        thresholds=thresholds,
        trained=_trained(model, trained),
    )


def make_card(
    *,
    privacy: PrivacySettings,
    ledger: PrivacyLedger,
    delta: float,
    num_samples: int | None,
    sample_rate: float,
    thresholds: Mapping[str, float],
    trained: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the card; epsilon is recomputed from the ledger's full history.

    ``trained`` (from :func:`_trained`) says which parameters the guarantee covers: those
    clipped and noised. The others (a LoRA model's frozen base) were not trained on this data;
    the guarantee says nothing about where they came from.
    """
    steps = ledger.steps
    return {
        "format": CARD_FORMAT,
        "epsilon": ledger.epsilon(delta),
        "delta": delta,
        "accountant": ledger.accountant,
        "neighbouring_relation": NEIGHBOURING_RELATION,
        "noise_multiplier": privacy.noise_multiplier,
        "sample_rate": sample_rate,
        "sample_rates": _sample_rates(ledger),
        "poisson_sampling": privacy.poisson,
        "steps": steps,
        "dataset_size": num_samples,
        "expected_batch_size": sample_rate * num_samples if num_samples else None,
        "clipping": privacy.clipping,
        "clip_fn": privacy.clip_fn,
        "gamma": privacy.gamma if privacy.clip_fn == "automatic" else None,
        "thresholds_mode": privacy.thresholds,
        "thresholds": dict(thresholds),
        "sensitivity": sum(c**2 for c in thresholds.values()) ** 0.5,
        **(_adaptive_settings(privacy) if privacy.thresholds == "adaptive" else {}),
        "secure_mode": privacy.secure_mode,
        **(dict(trained) if trained is not None else {}),
        "releases": [list(entry) for entry in ledger.history],
        "lightning_dp_version": _version("lightning-dp"),
        "torch_version": torch.__version__,
    }


def _sample_rates(ledger: PrivacyLedger) -> list[list[float]]:
    """``[q, steps]`` for each sampling rate the DP-SGD steps used, in order. ``sample_rate``
    and ``dataset_size`` are the last train loader's; a loader reloaded with another size
    (``reload_dataloaders_every_n_epochs``) trained the earlier steps at another rate."""
    rates: list[list[float]] = []
    for entry in ledger.history:
        if entry.kind != "step":
            continue
        if rates and rates[-1][0] == entry.sample_rate:
            rates[-1][1] += entry.count
        else:
            rates.append([entry.sample_rate, entry.count])
    return rates


def _adaptive_settings(privacy: PrivacySettings) -> dict[str, Any]:
    """What adaptive thresholds add to the guarantee: the noisy counts released each step
    (charged jointly with the gradient, so ``releases`` holds sigma_eff) and how they move C."""
    return {
        "count_noise_multiplier": privacy.count_noise_multiplier,
        "target_quantile": privacy.target_quantile,
        "threshold_lr": privacy.threshold_lr,
        "initial_threshold": privacy.initial_threshold if privacy.initial_threshold is not None else privacy.max_grad_norm,
    }


def _accountant_callback(trainer: pl.Trainer) -> PrivacyAccountant | None:
    return next((c for c in trainer.callbacks if isinstance(c, PrivacyAccountant)), None)


def _saved_accountant_state(checkpoint: Mapping[str, Any]) -> Mapping[str, Any]:
    """The saved PrivacyAccountant state (keyed by its class name in Lightning checkpoints)."""
    for key, value in checkpoint.get("callbacks", {}).items():
        if str(key).startswith(PrivacyAccountant.__name__):
            return value
    return {}


def _required_delta(delta: float | None) -> float:
    if delta is None:
        raise ValueError(
            "privacy card: delta is unknown (no PrivacyAccountant in the Trainer or checkpoint); "
            "pass delta=... (well below 1/N)."
        )
    return float(delta)


def _planned(model: nn.Module, privacy: PrivacySettings) -> nn.Module:
    """``model`` made private as training made it (a copy, unless it already is)."""
    if is_private(model):
        return model
    # Groups depend only on the model and the privacy settings; fallback=True cannot change a
    # group that training formed (without it, make_private would have refused the module).
    return make_private(
        copy.deepcopy(model), clipping=privacy.clipping, clip_fn=privacy.clip_fn,
        max_grad_norm=privacy.max_grad_norm, gamma=privacy.gamma, fallback=True,
    )


def _trained(model: nn.Module, trained_names: Iterable[str]) -> dict[str, Any]:
    """The parameters clipped and noised (the trained ones: every plan of the run, as the
    strategy recorded them, so a layer unfrozen or frozen part-way counts), and how much of
    ``model`` they are."""
    params = dict(model.named_parameters())
    count = sum(params[n].numel() for n in trained_names if n in params)
    return {
        "trained_parameters": sorted(trained_names),
        "trained_parameter_count": count,
        "frozen_parameter_count": sum(p.numel() for p in params.values()) - count,
    }


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
