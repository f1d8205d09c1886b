"""Resuming under a DP strategy needs the checkpoint's privacy state; unreadable checkpoint
files give one clear error naming the file. Nothing is trained or charged when refused."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from dp_fixtures import Classifier, flat_params, lightning_dp, toy_dataset, trainer
from torch.utils.data import DataLoader

N, BATCH = 96, 24


def _loader():
    return DataLoader(toy_dataset(N), batch_size=BATCH)


def _checkpoint(tmp_path, private: bool):
    torch.manual_seed(1)
    model = Classifier(reduction="none" if private else "mean")  # plain Lightning needs a scalar
    strategy = lightning_dp.DPStrategy(noise_multiplier=1.0, seed=0) if private else "auto"
    fitted = trainer(strategy, max_steps=4)
    fitted.fit(model, _loader())
    path = tmp_path / ("private.ckpt" if private else "plain.ckpt")
    fitted.save_checkpoint(path)
    return path


@pytest.mark.parametrize("source", ["non_private_training", "privacy_entry_removed"])
def test_resuming_a_checkpoint_without_privacy_state_is_refused(tmp_path, source):
    path = _checkpoint(tmp_path, private=source == "privacy_entry_removed")
    if source == "privacy_entry_removed":
        checkpoint = torch.load(path, weights_only=False)
        del checkpoint["lightning_dp"]
        torch.save(checkpoint, path)
    model = Classifier()
    before = flat_params(model)
    strategy = lightning_dp.DPStrategy(noise_multiplier=1.0, seed=0)
    with pytest.raises(ValueError, match=rf"(?s){re.escape(str(path))}.*no lightning-dp privacy state.*load the weights"):
        trainer(strategy, max_steps=8).fit(model, _loader(), ckpt_path=path)
    assert strategy.private.ledger.steps == 0
    torch.testing.assert_close(flat_params(model), before, rtol=0, atol=0)  # not restored, not trained


@pytest.mark.parametrize(("n", "batch"), [(N, 12), (2 * N, BATCH)], ids=["batch size", "dataset size"])
def test_resuming_with_other_data_or_batch_size_says_what_differs(tmp_path, n, batch):
    path = _checkpoint(tmp_path, private=True)
    strategy = lightning_dp.DPStrategy(noise_multiplier=1.0, seed=0)
    match = (rf"(?s)trained on N={N} examples with an expected batch of {BATCH} .*this run has N={n} and {batch} "
             r".*start a new run from the weights")
    with pytest.raises(ValueError, match=match):
        trainer(strategy, max_steps=8).fit(Classifier(), DataLoader(toy_dataset(n), batch_size=batch), ckpt_path=path)
    assert strategy.private.ledger.steps == 4  # the checkpoint's, nothing more


def test_pretrained_weights_start_a_fresh_private_run(tmp_path):
    path = _checkpoint(tmp_path, private=False)
    model = Classifier()
    model.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
    torch.testing.assert_close(flat_params(model), flat_params(Classifier.load_from_checkpoint(path)))
    strategy = lightning_dp.DPStrategy(noise_multiplier=1.0, seed=0)
    fitted = trainer(strategy, max_steps=3)
    fitted.fit(model, _loader())
    assert strategy.private.ledger.steps == fitted.global_step == 3  # the ledger counts every step


class Evaluated(Classifier):
    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", F.cross_entropy(self(x), y))


def test_evaluating_a_checkpoint_without_privacy_state_is_allowed(tmp_path):
    path = _checkpoint(tmp_path, private=False)
    model = Evaluated()
    strategy = lightning_dp.DPStrategy(noise_multiplier=1.0, seed=0)
    trainer(strategy).test(model, _loader(), ckpt_path=path, weights_only=True)
    torch.testing.assert_close(flat_params(model), flat_params(Classifier.load_from_checkpoint(path)))
    assert strategy.private.ledger.steps == 0  # evaluation costs no budget


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "not_a_dict"])
def test_an_unreadable_checkpoint_is_one_clear_error_naming_the_file(tmp_path, damage):
    path = _checkpoint(tmp_path, private=True)
    data = path.read_bytes()
    if damage == "not_a_dict":
        torch.save(torch.zeros(3), path)
    else:
        path.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "garbage": b"not a checkpoint\n" * 64}[damage])
    model = Classifier()
    before = flat_params(model)
    strategy = lightning_dp.DPStrategy(noise_multiplier=1.0, seed=0)
    with pytest.raises(ValueError, match=re.escape(repr(str(path)))) as error:
        trainer(strategy, max_steps=8).fit(model, _loader(), ckpt_path=path)
    assert "not a Lightning checkpoint" in str(error.value) or "empty, truncated or corrupt" in str(error.value)
    assert strategy.private.ledger.steps == 0
    torch.testing.assert_close(flat_params(model), before, rtol=0, atol=0)
