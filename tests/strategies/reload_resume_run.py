"""Train with strategy="dp" and reload_dataloaders_every_n_epochs=1, optionally SIGKILLed
mid-epoch or resuming from a checkpoint; dump what happened.

    python reload_resume_run.py OUT.pt full
    python reload_resume_run.py OUT.pt killed CKPT_DIR KILL_AT
    python reload_resume_run.py OUT.pt resume CKPT_PATH
"""

from __future__ import annotations

import os
import signal
import sys

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dp_fixtures import Classifier, toy_dataset  # noqa: E402

import lightning_dp  # noqa: E402

TOTAL_STEPS, BATCH = 20, 24  # 96 examples: 4 steps per epoch, 5 reloaded epochs


class DPModule(Classifier):
    def train_dataloader(self):  # rebuilt by Lightning every epoch
        return DataLoader(toy_dataset(96), batch_size=BATCH)


class RecordBatches(L.Callback):
    def __init__(self, kill_at: int | None = None) -> None:
        self.seen: list[list[float]] = []
        self.kill_at = kill_at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.kill_at is not None and trainer.global_step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # no teardown, no final checkpoint
        self.seen.append(sorted(batch[0][:, 0].tolist()))


def main() -> None:
    out, mode = sys.argv[1], sys.argv[2]
    L.seed_everything(0)
    model = DPModule()
    recorder = RecordBatches(kill_at=int(sys.argv[4]) if mode == "killed" else None)
    accountant = lightning_dp.PrivacyAccountant(target_epsilon=8.0, accountant="rdp")
    callbacks = [recorder, accountant]
    if mode == "killed":
        callbacks.append(ModelCheckpoint(dirpath=sys.argv[3], every_n_train_steps=1, save_top_k=-1))
    trainer = L.Trainer(
        strategy=lightning_dp.DPStrategy(max_grad_norm=0.5, seed=7), accelerator="cpu",
        max_steps=TOTAL_STEPS, reload_dataloaders_every_n_epochs=1, callbacks=callbacks,
        logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=mode == "killed",
    )
    trainer.fit(model, ckpt_path=sys.argv[3] if mode == "resume" else None)
    private = trainer.strategy.private
    torch.save(
        {
            "params": torch.cat([p.detach().flatten() for p in model.parameters()]),
            "epsilon": private.ledger.epsilon(accountant.delta),
            "logged_epsilon": accountant.epsilon,
            "steps": private.ledger.steps,
            "global_step": trainer.global_step,
            "seen": recorder.seen,
        },
        out,
    )


if __name__ == "__main__":
    main()
