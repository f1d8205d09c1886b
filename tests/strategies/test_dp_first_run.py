"""What a new user sees: a plan left to Lightning's defaults is flagged with the sigma it
implies, and the end of a run says whether the plan completed or the budget cut it short."""

from __future__ import annotations

import logging

import lightning as L
import pytest
from dp_fixtures import Classifier, toy_dataset, trainer
from torch.utils.data import DataLoader

import lightning_dp

N, BATCH = 96, 12
RANK_ZERO = "lightning.pytorch.utilities.rank_zero"


class StopAtOnce(L.Callback):
    def on_train_batch_end(self, trainer, *args):
        trainer.should_stop = True


def test_a_plan_left_to_lightnings_default_is_flagged_with_its_sigma():
    accountant = lightning_dp.PrivacyAccountant(target_epsilon=3.0, accountant="rdp")
    t = trainer(lightning_dp.DPStrategy(), callbacks=[accountant, StopAtOnce()], max_epochs=None)
    with pytest.warns(UserWarning, match=r"neither max_epochs nor max_steps.*1000 epochs \(8000 steps\).*sigma="):
        t.fit(Classifier(), DataLoader(toy_dataset(N), batch_size=BATCH))


def test_a_set_plan_is_not_flagged(recwarn):
    accountant = lightning_dp.PrivacyAccountant(target_epsilon=3.0, accountant="rdp")
    t = trainer(lightning_dp.DPStrategy(), callbacks=[accountant], max_steps=2)
    t.fit(Classifier(), DataLoader(toy_dataset(N), batch_size=BATCH))
    assert not [w for w in recwarn if "neither max_epochs" in str(w.message)]


def test_a_calibrated_run_ends_with_its_plan_complete_and_epsilon_in_digits(caplog):
    accountant = lightning_dp.PrivacyAccountant(target_epsilon=3.0, accountant="rdp")
    t = trainer(lightning_dp.DPStrategy(), callbacks=[accountant], max_epochs=2)
    with caplog.at_level(logging.INFO, logger=RANK_ZERO):
        t.fit(Classifier(), DataLoader(toy_dataset(N), batch_size=BATCH))
    done = [r.getMessage() for r in caplog.records if "privacy plan complete" in r.getMessage()]
    assert done == [f"lightning-dp: privacy plan complete after step {t.global_step}: epsilon "
                    f"{accountant.epsilon:.4f} of the target 3.0 at delta {accountant.delta:.3g}."]
    assert t.global_step == 2 * N // BATCH and 2.9 < accountant.epsilon <= 3.0


def test_a_given_sigma_that_runs_out_early_says_so(caplog):
    accountant = lightning_dp.PrivacyAccountant(target_epsilon=1.0, accountant="rdp")
    t = trainer(lightning_dp.DPStrategy(noise_multiplier=3.0), callbacks=[accountant], max_epochs=50)
    with caplog.at_level(logging.INFO, logger=RANK_ZERO):
        t.fit(Classifier(), DataLoader(toy_dataset(N), batch_size=BATCH))
    early = [r.getMessage() for r in caplog.records if "one more step would exceed" in r.getMessage()]
    assert len(early) == 1 and f"after step {t.global_step} of the 400 planned" in early[0]
    assert "not calibrated for this plan" in early[0] and 0 < t.global_step < 400


def test_a_sigma_too_small_for_even_one_step_is_named():
    accountant = lightning_dp.PrivacyAccountant(target_epsilon=1.0, accountant="rdp")
    t = trainer(lightning_dp.DPStrategy(noise_multiplier=0.5), callbacks=[accountant], max_epochs=1)
    with pytest.warns(UserWarning, match=r"a single step at sigma=0.5 .* already exceeds target epsilon 1.0"):
        t.fit(Classifier(), DataLoader(toy_dataset(N), batch_size=BATCH))
    assert t.global_step == 0


def test_the_readmes_first_snippet_runs_to_completion_in_seconds(tmp_path, monkeypatch):
    """The quick start as printed, on tiny data: it finishes (its plan is set) within the budget."""
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    assert "max_epochs" in snippet and "PrivacyAccountant(target_epsilon=3.0)" in snippet
    monkeypatch.chdir(tmp_path)  # lightning_logs/ and checkpoints land here
    scope = {"model": Classifier(), "train_dataloader": DataLoader(toy_dataset(N), batch_size=BATCH)}
    exec(compile(snippet, "README.md", "exec"), scope)
    trainer = scope["trainer"]
    accountant = next(c for c in trainer.callbacks if isinstance(c, lightning_dp.PrivacyAccountant))
    assert trainer.current_epoch == 3 and trainer.global_step == 3 * N // BATCH
    assert 2.9 < accountant.epsilon <= 3.0


class EpsilonPerStep(L.Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, *args):
        self.values.append(float(trainer.callback_metrics["epsilon"]))


def test_epsilon_in_the_progress_bar_moves_at_every_step_while_cheap():
    accountant = lightning_dp.PrivacyAccountant(target_epsilon=3.0, accountant="rdp", log_every_n_steps=50)
    seen = EpsilonPerStep()
    t = trainer(lightning_dp.DPStrategy(), callbacks=[accountant, seen], max_epochs=2)
    t.fit(Classifier(), DataLoader(toy_dataset(N), batch_size=BATCH))
    assert len(seen.values) == t.global_step == 16
    assert all(b > a for a, b in zip(seen.values, seen.values[1:]))  # not only at steps 1 and 50
    assert seen.values[-1] == pytest.approx(accountant.epsilon)
