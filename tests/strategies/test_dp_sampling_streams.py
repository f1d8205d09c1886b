"""Rebuilt train loaders continue the run's Poisson stream: reloaded epochs draw new batches,
exactly those of a run that never reloads, and a run killed mid-epoch and resumed under reloads
ends where the uninterrupted run ends."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning as L
import torch
from dp_fixtures import Classifier, flat_params, lightning_dp, toy_dataset, trainer
from torch.utils.data import DataLoader

SCRIPT = Path(__file__).with_name("resume_run.py")
N, BATCH, EPOCHS = 96, 24, 3  # 4 steps per epoch


class Reloading(Classifier):
    def train_dataloader(self):
        return DataLoader(toy_dataset(N), batch_size=BATCH)


class RecordBatches(L.Callback):
    def __init__(self) -> None:
        self.epochs: list[list[tuple[float, ...]]] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.epochs.append([])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.epochs[-1].append(tuple(sorted(batch[0][:, 0].tolist())))  # feature 0 names the example


def _fit(reload: int):
    torch.manual_seed(0)
    model, recorder = Reloading(), RecordBatches()
    strategy = lightning_dp.DPStrategy(noise_multiplier=1.0, seed=3)
    fitted = trainer(strategy, [recorder], max_epochs=EPOCHS, reload_dataloaders_every_n_epochs=reload)
    fitted.fit(model)
    return recorder.epochs, strategy.private, model


def test_reloaded_epochs_draw_new_batches_from_the_same_stream():
    reloaded, private, model = _fit(reload=1)
    assert private.ledger.steps == EPOCHS * N // BATCH
    assert len({tuple(epoch) for epoch in reloaded}) == EPOCHS  # no epoch repeats another
    first_batches = [epoch[0] for epoch in reloaded]
    assert len(set(first_batches)) == EPOCHS
    kept, _, kept_model = _fit(reload=0)
    assert reloaded == kept  # a rebuilt sampler continues exactly where the old one stopped
    torch.testing.assert_close(flat_params(model), flat_params(kept_model), rtol=0, atol=0)


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(SCRIPT), *args, "--reload"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen) -> tuple[int, str]:
    try:
        _, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return process.returncode, stderr


def test_sigkilled_run_under_reloads_resumes_to_the_uninterrupted_result(tmp_path):
    kill_at = 10  # mid-way through the third epoch (4 steps per epoch)
    full = _start(str(tmp_path / "full.pt"), "full")  # the reference and the killed run in parallel
    killed = _start(str(tmp_path / "killed.pt"), "killed", str(tmp_path / "ckpt"), str(kill_at))
    code, stderr = _finish(full)
    assert code == 0, stderr[-3000:]
    code, stderr = _finish(killed)
    assert code == -9, stderr[-3000:]  # SIGKILL
    checkpoint = next(p for p in (tmp_path / "ckpt").iterdir() if f"step={kill_at}." in p.name)
    code, stderr = _finish(_start(str(tmp_path / "resumed.pt"), "resume", str(checkpoint)))
    assert code == 0, stderr[-3000:]

    want = torch.load(tmp_path / "full.pt", weights_only=True)
    got = torch.load(tmp_path / "resumed.pt", weights_only=True)
    epochs = [tuple(map(tuple, want["seen"][i : i + 4])) for i in range(0, 20, 4)]
    assert len(set(epochs)) == 5  # every reloaded epoch drew new batches
    assert got["seen"] == want["seen"][kill_at:]  # the same batches, from the right one on
    assert got["steps"] == want["steps"] == got["global_step"] == want["global_step"] == 20
    assert got["epsilon"] == want["epsilon"] and got["logged_epsilon"] == want["logged_epsilon"]
    torch.testing.assert_close(got["params"], want["params"], rtol=0, atol=0)
