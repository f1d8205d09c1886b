"""Trainer(strategy="dp_fsdp", devices=2) on CPU/gloo; Lightning re-runs this script per rank.

    python fsdp_trainer_run.py OUT_DIR MAX_STEPS sharded|full [CKPT_PATH] [--adaptive] [--compile]
        [--mixing-loss]

``--mixing-loss`` scales every example's loss by the batch's mean loss (examples mixed).
"""

from __future__ import annotations

import json
import os
import sys

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fsdp_models import TinyTransformer, per_example_loss  # noqa: E402

import lightning_dp  # noqa: E402
from lightning_dp.engine.make_private import _state  # noqa: E402


class LanguageModel(L.LightningModule):
    def __init__(self, mixing_loss: bool = False) -> None:
        super().__init__()
        self.model = TinyTransformer()
        self.mixing_loss = mixing_loss

    def training_step(self, batch, batch_idx):
        losses = per_example_loss(self.model, batch[0])  # per-example losses
        return losses * losses.detach().mean() if self.mixing_loss else losses

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def main() -> None:
    adaptive, compiled = "--adaptive" in sys.argv, "--compile" in sys.argv
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    out, max_steps, layout = args[0], int(args[1]), args[2]
    ckpt = args[3] if len(args) > 3 else None
    L.seed_everything(0)
    data = TensorDataset(torch.randint(0, 17, (64, 8), generator=torch.Generator().manual_seed(0)))
    accountant = lightning_dp.PrivacyAccountant(target_epsilon=4.0, accountant="rdp", log_every_n_steps=1)
    trainer = L.Trainer(
        strategy=lightning_dp.DPFSDPStrategy(
            max_grad_norm=1.0, seed=3, max_physical_batch_size=4,
            save_distributed_checkpoint=layout == "sharded",
            thresholds="adaptive" if adaptive else "fixed", initial_threshold=0.05 if adaptive else None,
            compile=compiled,
        ),
        accelerator="cpu", devices=2, max_steps=max_steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[accountant, ModelCheckpoint(dirpath=f"{out}/ckpt", every_n_train_steps=3, save_top_k=-1)],
    )
    module = LanguageModel(mixing_loss="--mixing-loss" in sys.argv)
    trainer.fit(module, DataLoader(data, batch_size=16), ckpt_path=ckpt)
    params = {n: p.full_tensor() for n, p in module.named_parameters()}
    private = trainer.strategy.private
    if adaptive:  # every rank's thresholds, to check that the ranks agree
        torch.save(private.adaptive.history, f"{out}/thresholds_rank{trainer.global_rank}.pt")
    if trainer.global_rank == 0:
        torch.save(params, f"{out}/params.pt")
        with open(f"{out}/result.json", "w") as f:
            json.dump({
                "epsilon": accountant.epsilon,
                "logged": float(trainer.callback_metrics["epsilon"]),
                "ledger_steps": private.ledger.steps,
                "global_step": trainer.global_step,
                "sigma": private.privacy.noise_multiplier,
                "sigma_eff": private.effective_noise_multiplier,
                "ledger_sigma": [entry.noise_multiplier for entry in private.ledger.history],
                "q": private.sample_rate,
                "delta": accountant.delta,
                "groups": sorted(lightning_dp.group_thresholds(module)),
                "self_check_pending": private.pending_self_check,
                "compiled_sites": sum(site.compiled for site in _state(module).sites),
            }, f)


if __name__ == "__main__":
    main()
    # Tear gloo down before interpreter exit: left to shutdown, its threads can abort the
    # process ("terminate called without an active exception") after the run has succeeded.
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
