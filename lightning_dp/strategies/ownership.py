"""A model object remembers the private run that trained it; another run on it is refused.

The privacy ledger belongs to a strategy, so a second ``Trainer`` on a model object already
trained privately would start a new ledger at 0 and report only its own run's epsilon, while
the weights carry both runs. Chosen behaviour: refuse, with the epsilon already spent in the
message. Continuing on the *same* Trainer (its ledger and sampling stream continue) and resuming
a checkpoint (its ledger is restored) are the ways to train on; loading the weights into a new
model object is a deliberate new run whose epsilon covers only its own training.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from lightning_dp.strategies.private_training import PrivateTraining

_ATTRIBUTE = "_lightning_dp_trained_by"


class TrainedBy:
    """The private run that last trained a model (stored on the model object)."""

    def __init__(self, private: PrivateTraining | None) -> None:
        self.private = private

    def __deepcopy__(self, memo: dict[int, Any]) -> TrainedBy:
        return self  # a copy of the model shares its privacy history

    def __reduce__(self) -> tuple[Any, ...]:
        return (TrainedBy, (None,))  # a pickled model keeps its weights, not the live run


def claim(private: PrivateTraining, module: nn.Module, resumed: bool) -> None:
    """Record ``private`` as the run training ``module``; refuse when another run has already
    spent privacy on it, unless this run resumed a checkpoint (whose ledger it restored)."""
    previous = getattr(module, _ATTRIBUTE, None)
    other = previous.private if isinstance(previous, TrainedBy) else None
    if other is not None and other is not private and other.ledger.steps > 0 and not resumed:
        raise ValueError(
            f"lightning-dp: this {type(module).__name__} was already trained privately by another "
            f"Trainer: {_spent(other)}. A new Trainer starts a new privacy ledger, so it would "
            "report only its own run's epsilon while the weights carry both runs. To train on "
            "and keep the accounting, call fit again on the same Trainer (raise max_epochs or "
            "max_steps; its ledger and sampling stream continue), or resume that run's "
            "checkpoint: Trainer(...).fit(model, ckpt_path=...). To start a separate run on "
            "purpose, load the weights into a new model object; the privacy cost of both runs "
            "then adds up, and the new run's epsilon covers only its own."
        )
    object.__setattr__(module, _ATTRIBUTE, TrainedBy(private))


def _spent(private: PrivateTraining) -> str:
    ledger = private.ledger
    delta = private.delta if private.delta is not None else 1.0 / (10 * (private.num_samples or 1))
    sigma, q = private.privacy.noise_multiplier, private.accounted_sample_rate
    return (f"{ledger.steps} steps at noise_multiplier={sigma:.4g}, q={q:.4g}, spending "
            f"epsilon={ledger.epsilon(delta):.4g} at delta={delta:.3g}")
