"""Reading checkpoints for a DP run: unreadable files and checkpoints without privacy state.

A checkpoint resumed with ``trainer.fit(..., ckpt_path=...)`` continues the step count, the
weights and the optimizer; without lightning-dp's entry (the ledger, the sampler and noise
streams) the ledger would restart at 0 and the reported epsilon would leave out what the
checkpoint's training spent. Such a resume is refused; evaluation (``test``, ``validate``,
``predict``) of any checkpoint costs no budget and is allowed.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning.pytorch.trainer.states import TrainerFn

CHECKPOINT_KEY = "lightning_dp"


def read_checkpoint(load: Callable[[], Any], checkpoint_path: Any) -> dict[str, Any]:
    """``load()``'s checkpoint dict; one clear error naming the file when it cannot be read
    (empty, truncated, corrupt, or not a checkpoint)."""
    try:
        checkpoint = load()
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as error:
        if "Unsupported global" in str(error):
            raise  # readable, but holds objects torch.load(weights_only=True) refuses: torch says which
        raise _unreadable(checkpoint_path, error) from error
    except Exception as error:  # torch.load fails in many ways (EOFError, RuntimeError, KeyError...)
        raise _unreadable(checkpoint_path, error) from error
    if not isinstance(checkpoint, dict):
        raise ValueError(  # noqa: TRY004  (one error type for every checkpoint that cannot be used)
            f"The file {str(checkpoint_path)!r} holds a {type(checkpoint).__name__}, not a "
            "Lightning checkpoint (a dict with 'state_dict'); pass a checkpoint written by the "
            "Trainer."
        )
    return checkpoint


def refuse_resume_without_privacy_state(checkpoint: dict[str, Any], checkpoint_path: Any, trainer: Any) -> None:
    """Refuse to resume training from a checkpoint that has no lightning-dp privacy state."""
    if CHECKPOINT_KEY in checkpoint or trainer is None or trainer.state.fn != TrainerFn.FITTING:
        return
    raise ValueError(
        f"The checkpoint {str(checkpoint_path)!r} has no lightning-dp privacy state (no "
        f"{CHECKPOINT_KEY!r} entry: it was written by non-private training, or the entry was "
        "removed). Resuming it with trainer.fit(..., ckpt_path=...) would continue its steps, "
        "weights and optimizer with a privacy ledger at 0, so the epsilon reported would leave "
        "out whatever its training spent. To start private training from pretrained weights, "
        "load the weights into the model and do not resume the trainer state: "
        "`model.load_state_dict(torch.load(path, weights_only=True)['state_dict'])` (or "
        "`Model.load_from_checkpoint(path)`), then `trainer.fit(model, ...)` without ckpt_path. "
        "The new run's epsilon covers only its own training data."
    )


def _unreadable(checkpoint_path: Any, error: Exception) -> ValueError:
    detail = " ".join(str(error).split())
    if "WeightsUnpickler error:" in detail:  # torch's generic advice to retry unsafely does not apply
        detail = detail.split("WeightsUnpickler error:")[1].split(" Check the documentation")[0].strip()
    detail = detail if len(detail) <= 240 else detail[:240] + "..."
    return ValueError(
        f"Cannot read the checkpoint {str(checkpoint_path)!r} ({_size_of(checkpoint_path)}): it is "
        f"empty, truncated or corrupt ({type(error).__name__}: {detail}). Resume from an intact "
        "checkpoint, e.g. an earlier one of the same run (a run killed while saving can leave a "
        "partial file)."
    )


def _size_of(path: Any) -> str:
    try:
        return f"{Path(path).stat().st_size} bytes"
    except (OSError, TypeError, ValueError):
        return "size unknown"
