"""The DP training step as a strategy mixin, shared by ``dp`` and ``dp_fsdp``.

One training batch is one logical (Poisson) batch. Lightning's closure runs ``training_step``,
then ``zero_grad``, then backward; so ``training_step`` runs only the first micro-batch and
the closure wrapper in ``optimizer_step`` runs the others after it, then adds noise once,
divides by q*N and lets the optimizer step once. Batches stay on the host until each
micro-batch is moved, so device memory is bounded by the physical batch.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.trainer.states import RunningStage
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from lightning_dp.compiling import watch_compiled_graphs
from lightning_dp.data.microbatch import pad_batch
from lightning_dp.engine import clipper_of
from lightning_dp.engine.self_check import SelfCheckReport, self_check
from lightning_dp.strategies.checkpoints import (
    CHECKPOINT_KEY,
    read_checkpoint,
    refuse_resume_without_privacy_state,
)
from lightning_dp.strategies.loss import empty_loss, summed_loss
from lightning_dp.strategies.monitors import warn_if_monitoring_training_metrics
from lightning_dp.strategies.optimizers import evaluated_once, refuse_multi_evaluation_optimizer
from lightning_dp.strategies.poisson_loader import (
    checked_collate,
    fixed_batches_rate,
    poisson_dataloader,
    refuse_several_train_loaders,
    sample_rate_of,
    warn_if_sampler_overridden,
)
from lightning_dp.strategies.private_training import PrivateTraining, batch_size_of, split_batch


class PrivateStepMixin:
    """Poisson data, micro-batching, one noisy step per logical batch, privacy state in checkpoints.

    Subclasses set ``self.private`` and may override :meth:`micro_batches` (to keep ranks in
    lockstep) and ``skip_empty_batches`` (False where every rank must join the collectives).
    """

    private: PrivateTraining
    skip_empty_batches = True
    _compiled = False
    _steps_run = 0

    def process_dataloader(self, dataloader: object) -> object:
        trainer = self.lightning_module.trainer
        if trainer.state.stage != RunningStage.TRAINING or not isinstance(dataloader, DataLoader):
            return super().process_dataloader(dataloader)
        num_samples, sample_rate = sample_rate_of(dataloader)
        rank, world_size = self.data_parallel_rank_and_size()
        if not self.private.privacy.poisson:
            # the expected batch divides the step's sum over every device's batch
            sample_rate = fixed_batches_rate(dataloader, num_samples, world_size)
            self.private.num_samples, self.private.sample_rate = num_samples, sample_rate
            self.private.fix_physical_batch_size()
            dataloader.collate_fn = checked_collate(dataloader)
            return dataloader
        warn_if_sampler_overridden(dataloader, sample_rate)
        sampler = self.private.make_sampler(num_samples, sample_rate, rank, world_size)
        self.private.fix_physical_batch_size(world_size)
        return poisson_dataloader(dataloader, sampler)

    def on_train_start(self) -> None:
        refuse_several_train_loaders(self.lightning_module.trainer.train_dataloader)
        # after any checkpoint is restored: a model another Trainer trained privately is refused
        self.private.claim(self.lightning_module)
        super().on_train_start()

    def data_parallel_rank_and_size(self) -> tuple[int, int]:
        return self.global_rank, self.world_size

    def compile_model(self) -> None:
        """Compile the private model (``compile=True``), called after the first, eager step."""
        raise NotImplementedError

    def sum_across_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a per-rank statistic (the adaptive-threshold counts) over data-parallel ranks."""
        return tensor

    def batch_to_device(self, batch: Any, device: torch.device | None = None, dataloader_idx: int = 0) -> Any:
        if self.lightning_module.trainer.state.stage == RunningStage.TRAINING:
            return batch  # moved one micro-batch at a time
        return super().batch_to_device(batch, device, dataloader_idx)

    def micro_batches(self, batch: Any) -> list[Any]:
        return split_batch(batch, self.private.speed.max_physical_batch_size)

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        self._steps_run += 1
        if self._steps_run == 2:  # the first step of this strategy has logged (resumed or not)
            warn_if_monitoring_training_metrics(self.lightning_module.trainer)
        batch, rest = args[0], args[1:]
        if self.skip_empty_batches and batch_size_of(batch) == 0:
            self._later_micro_batches = []
            return empty_loss(self.root_device)
        first, *later = self.micro_batches(batch)
        self._later_micro_batches, self._step_args = later, (rest, kwargs)
        return self._micro_step(first, rest, kwargs)

    def _micro_step(self, micro_batch: Any, rest: tuple, kwargs: dict) -> Any:
        module = self.lightning_module
        self.private.follow_trainable_parameters(module)
        if self.private.pending_self_check:
            self._self_check(super().batch_to_device(micro_batch), rest, kwargs)
        real = batch_size_of(micro_batch)
        if self.private.speed.compile:  # one shape for the compiled model
            micro_batch, _ = pad_batch(micro_batch, self.private.speed.max_physical_batch_size)
        elif real == 0:  # a rank joining the collectives: one row, as models such as HF's need
            micro_batch, _ = pad_batch(micro_batch, 1)
        # padding rows are clipped to exactly 0 (this micro-batch's backward runs before the next)
        clipper_of(module).real_rows = real if batch_size_of(micro_batch) != real else None
        micro_batch = super().batch_to_device(micro_batch)
        with clipper_of(module).pinned_examples(batch_size_of(micro_batch)):
            output, summed = self._summed_training_loss(micro_batch, rest, kwargs)
        if self._compiled:
            watch_compiled_graphs(module, summed)
        if real == 0:
            summed = summed * 0  # the padding row's loss is not this rank's loss
        return {**output, "loss": summed} if isinstance(output, dict) else summed

    def _summed_training_loss(self, micro_batch: Any, rest: tuple, kwargs: dict) -> tuple[Any, Any]:
        """``training_step``'s output, and the sum over examples of the loss it returned."""
        output = super().training_step(micro_batch, *rest, **kwargs)
        loss = output["loss"] if isinstance(output, dict) else output
        return output, summed_loss(loss, batch_size_of(micro_batch), self.private.loss_reduction)

    def _self_check(self, micro_batch: Any, rest: tuple, kwargs: dict) -> None:
        """Before the first release: the engine's per-example norms against single-example
        passes of the user's own ``training_step`` (``lightning_dp.self_check``). Stays pending
        until a micro-batch holds examples."""
        loss_fn = lambda _model, batch: self._summed_training_loss(batch, rest, kwargs)[1]  # noqa: E731
        rtol = 5e-2 if self.low_precision() else 1e-3
        self.private.pending_self_check = False  # a failed check raises: it is not retried
        if self.run_self_check(loss_fn, micro_batch, rtol) is None:
            self.private.pending_self_check = True

    def run_self_check(self, loss_fn: Any, micro_batch: Any, rtol: float) -> SelfCheckReport | None:
        """Check on this process's micro-batch; None when it holds no example."""
        if batch_size_of(micro_batch) == 0:
            return None
        return self_check(self.lightning_module, loss_fn, micro_batch, rtol=rtol)

    def low_precision(self) -> bool:
        return "16" in str(getattr(self.precision_plugin, "precision", "32"))

    def optimizer_step(self, optimizer: Optimizer, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        refuse_multi_evaluation_optimizer(optimizer)  # before anything is computed or released
        def private_closure() -> Any:
            result = closure()  # first micro-batch: training_step, zero_grad, backward
            rest, step_kwargs = getattr(self, "_step_args", ((), {}))
            for micro_batch in getattr(self, "_later_micro_batches", []):
                output = self._micro_step(micro_batch, rest, step_kwargs)
                (output["loss"] if isinstance(output, dict) else output).backward()
            self._later_micro_batches = []
            clipper_of(self.lightning_module).real_rows = None
            self.private.refuse_unclipped_gradients(self.lightning_module, optimizer)
            self.private.changed_buffers.check(self.lightning_module)
            if self.private.speed.compile and not self._compiled and clipper_of(self.lightning_module).stats:
                # The first step that ran the model ran eagerly, where the leak guard sees any
                # gradient that bypassed clipping (a compiled graph hands autograd clipped
                # gradients, so it cannot tell); later steps run compiled.
                self.compile_model()
                self._compiled = True
            rank, _ = self.data_parallel_rank_and_size()
            self.private.noise_and_normalize(self.lightning_module, rank, self.root_device, self.sum_across_ranks)
            return result

        return super().optimizer_step(optimizer, evaluated_once(private_closure, optimizer), model, **kwargs)

    # -- checkpoints: every rank's sampler and noise streams, the ledger -----------------
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        states = [self.private.state_dict()]
        if dist.is_available() and dist.is_initialized() and self.world_size > 1:
            states = [None] * self.world_size
            dist.all_gather_object(states, self.private.state_dict())
        checkpoint[CHECKPOINT_KEY] = {"ranks": states}
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def load_checkpoint(self, checkpoint_path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        checkpoint = read_checkpoint(partial(super().load_checkpoint, checkpoint_path, *args, **kwargs), checkpoint_path)
        trainer = getattr(self.lightning_module, "_trainer", None)
        refuse_resume_without_privacy_state(checkpoint, checkpoint_path, trainer)
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved is not None:
            states = saved["ranks"]
            if len(states) != self.world_size:
                raise ValueError(
                    f"The checkpoint holds the privacy state of {len(states)} ranks but this run "
                    f"has {self.world_size}; resume with the same number of devices, or the "
                    "Poisson sampling streams and the accounting would not continue."
                )
            self.private.load_state_dict(states[self.global_rank])
        return checkpoint
