"""The ``lightning-dp`` command: LightningCLI with OmegaConf interpolation and an ``export`` subcommand.

    lightning-dp fit --config configs/fashion_mnist.yaml
    lightning-dp export --config configs/fashion_mnist.yaml --ckpt_path <run>/checkpoints/last.ckpt

Every privacy setting is an init arg of the strategy (``trainer.strategy``, class
``lightning_dp.DPStrategy``) or of the ``PrivacyAccountant`` callback, so YAML and the command
line reach all of them, and jsonargparse checks each against its type (``Literal`` choices,
numbers) before anything runs. OmegaConf interpolation is on: a config may derive one value
from another, e.g. ``${data.init_args.batch_size}``, with the ``dp.*`` arithmetic resolvers.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from omegaconf import OmegaConf

from lightning_dp.exporting import export, privacy_card_from_checkpoint
from lightning_dp.strategies.private_training import PrivateTraining

__all__ = ["DPTrainer", "LightningDPCLI", "main", "run"]


class DPTrainer(Trainer):
    """Lightning's Trainer plus ``export``, so that LightningCLI can offer it as a subcommand."""

    def export(
        self,
        model: LightningModule,
        datamodule: object | None = None,
        ckpt_path: str | None = None,
        output: str = "model.pt2",
        dynamic_batch: bool = True,
        aoti_package: str | None = None,
    ) -> None:
        """Export a privately trained checkpoint with torch.export and its privacy card.

        Args:
            model: the LightningModule of the config; its ``example_input_array`` is traced.
            datamodule: unused (accepted so a fit config can be reused as is).
            ckpt_path: the checkpoint written by ``lightning-dp fit``.
            output: the ``.pt2`` file; the card is also written to ``<output>.privacy.json``.
            dynamic_batch: export the batch dimension as dynamic.
            aoti_package: also write an AOTInductor-compiled package there.
        """
        if ckpt_path is None:
            raise ValueError(
                "export: --ckpt_path is missing; pass the checkpoint of a lightning-dp fit run, "
                "e.g. --ckpt_path lightning_logs/version_0/checkpoints/last.ckpt."
            )
        private = getattr(self.strategy, "private", None)
        if not isinstance(private, PrivateTraining):
            raise ValueError(  # noqa: TRY004  (a wrong configuration value, not a wrong type)
                f"export: trainer.strategy is {type(self.strategy).__name__}, not a lightning-dp "
                "strategy; export with the config the model was trained with (its privacy "
                "settings define the clipping groups on the privacy card)."
            )
        example = model.example_input_array
        if example is None:
            raise ValueError(
                f"export: {type(model).__name__}.example_input_array is None; set it in the "
                "LightningModule's __init__ to an example input of forward."
            )
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model.load_state_dict(checkpoint["state_dict"])
        card = privacy_card_from_checkpoint(checkpoint, model, private.privacy)
        export(model, example, output, privacy_card=card, dynamic_batch=dynamic_batch, aoti_package=aoti_package)
        print(f"lightning-dp: exported {output} at epsilon {card['epsilon']:.4g} (delta {card['delta']:.3g})")


class ConciseErrorParser(LightningArgumentParser):
    """A wrong value is reported in a few lines: the usage printed before an error is one line
    (jsonargparse's tip names ``--help``), not the usage of every Trainer option."""

    def print_usage(self, file: Any = None) -> None:
        (file or sys.stdout).write(f"usage: {self.prog.replace(' [options]', '')} [options]\n")


class LightningDPCLI(LightningCLI):
    """LightningCLI with the ``export`` subcommand (arguments of :meth:`DPTrainer.export`)."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "export": {"model", "datamodule"}}


def _product(*factors: int | float) -> float:  # noqa: PYI041  (OmegaConf checks int vs float)
    return math.prod(factors)


def _quotient(numerator: int | float, denominator: int | float) -> float:  # noqa: PYI041
    return numerator / denominator


def _nearest_int(value: int | float) -> int:  # noqa: PYI041
    return round(value)


#: Arithmetic for config files, e.g. an expected batch size from q and N:
#: ``batch_size: ${dp.int:${dp.mul:0.017,60000}}``. Resolved inside the file only.
RESOLVERS = {"dp.mul": _product, "dp.div": _quotient, "dp.int": _nearest_int}


def register_resolvers() -> None:
    """Make the ``dp.*`` arithmetic resolvers available to OmegaConf interpolation."""
    for name, resolver in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_resolver(name, resolver)


DESCRIPTION = (
    "lightning-dp: differentially private (epsilon, delta) training with PyTorch Lightning. "
    "`fit --config configs/<recipe>.yaml` trains a recipe privately (Poisson sampling, "
    "per-example clipping, calibrated noise, a privacy accountant); `export --config ... "
    "--ckpt_path <run>/checkpoints/last.ckpt --output model.pt2` writes a torch.export program "
    "with its privacy card. `lightning-dp <subcommand> --help` lists a subcommand's options."
)


def run(args: ArgsType = None) -> LightningDPCLI:
    """Parse ``args`` (default ``sys.argv``) and run the subcommand; returns the CLI object."""
    register_resolvers()
    # The recipes train on packaged data and weights: never reach for a model hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return LightningDPCLI(
        trainer_class=DPTrainer,
        parser_class=ConciseErrorParser,
        parser_kwargs={"parser_mode": "omegaconf", "description": DESCRIPTION},
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def main() -> None:
    """Entry point of the ``lightning-dp`` console script."""
    run()


if __name__ == "__main__":
    main()
