"""Train with strategy="dp", optionally dying mid-run or resuming; dump what happened.

    python resume_run.py OUT.pt full [--reload]
    python resume_run.py OUT.pt killed CKPT_DIR KILL_AT [--reload]
    python resume_run.py OUT.pt resume CKPT_PATH [--reload]

Without ``--reload`` one loader serves the whole run (8 steps per epoch, so the kill lands
mid-epoch) and the kill is ``os._exit(3)``. With it the LightningModule's loader is rebuilt
every epoch (``reload_dataloaders_every_n_epochs=1``, 4 steps per epoch) and the kill is a
SIGKILL.
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

TOTAL_STEPS = 20
RELOAD = "--reload" in sys.argv
BATCH = 24 if RELOAD else 12  # 96 examples


class ReloadedLoader(Classifier):
    def train_dataloader(self):  # rebuilt by Lightning every epoch
        return DataLoader(toy_dataset(96), batch_size=BATCH)


class RecordBatches(L.Callback):
    def __init__(self, kill_at: int | None = None) -> None:
        self.seen: list[list[float]] = []
        self.kill_at = kill_at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.kill_at is not None and trainer.global_step == self.kill_at:
            # a hard kill: no teardown, no final checkpoint
            os.kill(os.getpid(), signal.SIGKILL) if RELOAD else os._exit(3)
        self.seen.append(sorted(batch[0][:, 0].tolist()) if RELOAD else batch[0].sum(1).tolist())


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--reload"]
    out, mode = args[0], args[1]
    L.seed_everything(0)
    model = ReloadedLoader() if RELOAD else Classifier()
    recorder = RecordBatches(kill_at=int(args[3]) if mode == "killed" else None)
    accountant = lightning_dp.PrivacyAccountant(target_epsilon=8.0, accountant="rdp")
    callbacks = [recorder, accountant]
    if mode == "killed":
        callbacks.append(ModelCheckpoint(dirpath=args[2], every_n_train_steps=1, save_top_k=-1))
    trainer = L.Trainer(
        strategy=lightning_dp.DPStrategy(max_grad_norm=0.5, seed=7 if RELOAD else None),
        accelerator="cpu", max_steps=TOTAL_STEPS, reload_dataloaders_every_n_epochs=int(RELOAD),
        callbacks=callbacks, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=mode == "killed",
    )
    loader = None if RELOAD else DataLoader(toy_dataset(96), batch_size=BATCH)
    trainer.fit(model, loader, ckpt_path=args[2] if mode == "resume" else None)
    private = trainer.strategy.private
    torch.save(
        {
            "params": torch.cat([p.detach().flatten() for p in model.parameters()]),
            "epsilon": private.ledger.epsilon(accountant.delta),
            "logged_epsilon": accountant.epsilon,
            "steps": private.ledger.steps,
            "global_step": trainer.global_step,
            "sigma": private.privacy.noise_multiplier,
            "seen": recorder.seen,
        },
        out,
    )


if __name__ == "__main__":
    main()
