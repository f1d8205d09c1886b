"""PrivacyReport: the per-step history, the card and the files, whatever the callback order."""

from __future__ import annotations

import json

import pytest
import torch
from dp_fixtures import Classifier, toy_dataset, trainer
from torch.utils.data import DataLoader

import lightning_dp
from lightning_dp.accounting import epsilon


@pytest.mark.parametrize("report_first", [True, False])
def test_history_has_each_steps_epsilon_and_the_files_hold_the_card(report_first, tmp_path):
    pytest.importorskip("matplotlib")
    torch.manual_seed(0)
    accountant = lightning_dp.PrivacyAccountant(target_epsilon=2.0, accountant="rdp")
    report = lightning_dp.PrivacyReport(str(tmp_path))
    strategy = lightning_dp.DPStrategy(max_grad_norm=0.5, seed=1)
    callbacks = [report, accountant] if report_first else [accountant, report]
    t = trainer(strategy, callbacks=callbacks, max_steps=6, log_every_n_steps=1)
    t.fit(Classifier(), DataLoader(toy_dataset(96), batch_size=12))

    sigma, delta = strategy.private.privacy.noise_multiplier, accountant.delta
    want = [epsilon(noise_multiplier=sigma, sample_rate=12 / 96, steps=k, delta=delta, accountant="rdp")
            for k in range(1, 7)]
    steps, values = zip(*report.history["epsilon"])
    assert list(steps) == [1, 2, 3, 4, 5, 6]
    assert list(values) == pytest.approx(want, rel=1e-6)  # logged as float32
    assert [s for s, _ in report.history["dp/threshold/net.0"]] == list(steps)

    saved = json.loads((tmp_path / "privacy_report.json").read_text())
    assert saved["card"] == report.card == lightning_dp.privacy_card(t)
    assert saved["card"]["epsilon"] == pytest.approx(accountant.epsilon, rel=1e-12)
    markdown = (tmp_path / "privacy_report.md").read_text()
    assert "| accountant | rdp |" in markdown and "| net.2 | 0.5 |" in markdown
    assert (tmp_path / "epsilon.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "clipping.png").read_bytes()[:4] == b"\x89PNG"


def test_a_card_before_training_is_refused():
    t = trainer(lightning_dp.DPStrategy(noise_multiplier=1.0), max_steps=1)
    with pytest.raises(ValueError, match="has not trained"):
        lightning_dp.privacy_card(t)
