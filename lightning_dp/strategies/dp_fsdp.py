"""``Trainer(strategy="dp_fsdp")``: DP training over FSDP2 with per-device (per-unit) clipping.

Order of operations at setup: shard (the module's own ``configure_model``, or ``fully_shard``
per block and then the root), rewrite for per-example clipping (one group per FSDP unit by
default), make every reduce-scatter a sum. Each rank Poisson-samples its own partition of the
data; the ranks agree on the number of micro-batches every step so FSDP's collectives stay in
lockstep (a rank with fewer examples runs empty micro-batches). After the reduce-scatter each
rank adds noise only to the shard it owns, from its own stream, and divides by the global q*N.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.init import _materialize_distributed_module
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.utils._pytree import tree_map
from typing_extensions import override

from lightning_dp.compiling import compile_submodules
from lightning_dp.engine import clipper_of
from lightning_dp.engine.clip_fns import ClipFn
from lightning_dp.engine.make_private import ThresholdMode
from lightning_dp.engine.self_check import SelfCheckReport, self_check_across_ranks
from lightning_dp.rules.norm_method import NormMethod
from lightning_dp.strategies.dp import check_trainer_supports_dp
from lightning_dp.strategies.fsdp_sharding import (
    fully_shard_kwargs,
    is_sharded,
    nested_units,
    shard_blocks,
    sum_gradients_across_ranks,
)
from lightning_dp.strategies.loss import LossReduction
from lightning_dp.strategies.private_step import PrivateStepMixin
from lightning_dp.strategies.private_training import (
    PrivacySettings,
    PrivateTraining,
    SpeedSettings,
    batch_size_of,
    split_batch,
)
from lightning_dp.thresholds import DEFAULT_TARGET_QUANTILE, DEFAULT_THRESHOLD_LR

FSDPClipping = str  # "unit" | "layer" | groups that stay inside one unit


class DPFSDPStrategy(PrivateStepMixin, ModelParallelStrategy):
    """DP-SGD over FSDP2: each device clips the gradient of the model piece it hosts.

    Args (privacy and speed, as for ``DPStrategy``):
        clipping: ``"unit"`` (default: one group per FSDP unit), ``"layer"``, or groups of
            parameter-name prefixes that each stay inside one unit. ``"flat"`` is refused: it
            would have to hold every unit's gradient until the whole backward ends, after FSDP
            has already reduce-scattered them.
        clip_fn, max_grad_norm, gamma, noise_multiplier, poisson, secure_mode, thresholds,
        target_quantile, threshold_lr, count_noise_multiplier, initial_threshold, seed,
        max_physical_batch_size, loss_reduction, norm_method, fallback: see ``DPStrategy``.
        block_types: module classes to shard one unit each when the LightningModule does not
            shard itself in ``configure_model``; default: repeated blocks detected by name.
        mp_policy: FSDP2 mixed precision for the units this strategy shards (norms are still
            accumulated in fp32).
        compile: ``torch.compile`` each nested FSDP unit's forward (the blocks) with the DP
            graph pass, FSDP's hooks left outside the graphs; root units run eagerly. Clipping
            groups must stay inside one unit (true of ``"unit"`` and ``"layer"``).
        save_distributed_checkpoint: sharded (True) or full (False) checkpoints.
        self_check: before the first step (and after the trainable parameters change), compare
            the engine's per-example group norms of a few examples of the first rank holding
            any with single-example passes of ``training_step`` run on every rank at once
            (``lightning_dp.self_check_across_ranks``); refuse to train if they differ.
    """

    strategy_name = "dp_fsdp"

    def __init__(
        self,
        *,
        clipping: FSDPClipping | list[list[str]] | dict[str, list[str]] = "unit",
        clip_fn: ClipFn = "abadi",
        max_grad_norm: float | dict[str, float] = 1.0,
        gamma: float = 0.01,
        noise_multiplier: float | None = None,
        poisson: bool = True,
        secure_mode: bool = False,
        thresholds: ThresholdMode = "fixed",
        target_quantile: float = DEFAULT_TARGET_QUANTILE,
        threshold_lr: float = DEFAULT_THRESHOLD_LR,
        count_noise_multiplier: float | None = None,
        initial_threshold: float | dict[str, float] | None = None,
        seed: int | None = None,
        max_physical_batch_size: int | None = None,
        loss_reduction: LossReduction = "auto",
        norm_method: NormMethod = "auto",
        fallback: bool = False,
        compile: bool = False,
        self_check: bool = True,
        block_types: list[type[nn.Module]] | None = None,
        mp_policy: MixedPrecisionPolicy | None = None,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        if clipping == "flat":
            raise ValueError(
                "dp_fsdp: clipping='flat' needs every unit's per-example norm before any unit's "
                "gradient may be clipped, but FSDP reduce-scatters each unit's gradient as soon "
                "as its backward ends. Use clipping='unit' (per-device) or 'layer', or the 'dp' "
                "strategy for flat clipping."
            )
        super().__init__(
            data_parallel_size="auto", tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend, timeout=timeout,
        )
        self.private = PrivateTraining(
            PrivacySettings(
                clipping, clip_fn, max_grad_norm, gamma, noise_multiplier, poisson, secure_mode,
                thresholds=thresholds, target_quantile=target_quantile, threshold_lr=threshold_lr,
                count_noise_multiplier=count_noise_multiplier, initial_threshold=initial_threshold,
            ),
            SpeedSettings(max_physical_batch_size, norm_method, fallback, compile),
            seed,
            loss_reduction,
            self_check,
        )
        self.block_types, self.mp_policy = block_types, mp_policy

    skip_empty_batches = False  # every rank joins every forward/backward's collectives

    @override
    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # pure data parallel
        super().setup_environment()

    @override
    def setup(self, trainer: Any) -> None:
        check_trainer_supports_dp(trainer, self)
        self.accelerator.setup(trainer)
        module = self.lightning_module
        if not is_sharded(module):
            shard_lightning_module(module, self.device_mesh["data_parallel"], self.block_types, self.mp_policy)
        _materialize_distributed_module(self.model, self.root_device)
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        self.private.make_private(module)
        check_groups_inside_units(module)
        sum_gradients_across_ranks(module)
        clipper_of(module).require_prompt_finish = True
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)

    @override
    def compile_model(self) -> None:
        module = self.lightning_module
        compile_submodules(module, nested_units(module), dynamic=False)

    @override
    def run_self_check(self, loss_fn: Any, micro_batch: Any, rtol: float) -> SelfCheckReport | None:
        """Collective: every rank joins each reference pass (FSDP's collectives run in them)."""
        group = self.device_mesh["data_parallel"].get_group()
        return self_check_across_ranks(self.lightning_module, loss_fn, micro_batch, group=group, rtol=rtol)

    @override
    def low_precision(self) -> bool:
        compute = getattr(self.mp_policy, "param_dtype", None)
        return super().low_precision() or compute in (torch.float16, torch.bfloat16)

    @override
    def data_parallel_rank_and_size(self) -> tuple[int, int]:
        mesh = self.device_mesh["data_parallel"]
        return mesh.get_local_rank(), mesh.size()

    @override
    def sum_across_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, group=self.device_mesh["data_parallel"].get_group())
        return tensor

    @override
    def micro_batches(self, batch: Any) -> list[Any]:
        """Split, then pad with empty micro-batches up to the most any rank needs this step."""
        parts = split_batch(batch, self.private.speed.max_physical_batch_size)
        if batch_size_of(batch) == 0:
            parts = []
        count = torch.tensor([len(parts)], device=self.root_device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        empty = tree_map(lambda t: t[:0] if isinstance(t, torch.Tensor) and t.dim() > 0 else t, batch)
        return parts + [empty] * (int(count) - len(parts)) or [empty]


def shard_lightning_module(module: nn.Module, mesh: Any, block_types: Any, mp_policy: Any) -> None:
    """Shard the blocks, then roots whose forwards Lightning's step methods run.

    Lightning calls ``training_step``, not the LightningModule's forward, and FSDP2 gathers a
    unit's own parameters in its forward. So the roots are the children whose forwards run
    (looking through ``ModuleList``/``ModuleDict``, which have none), unless parameters sit
    where no child's forward reaches them (on the LightningModule, in a container's
    ``ParameterList``): then the LightningModule is the root, with its step methods registered
    as FSDP forward methods.
    """
    shard_blocks(module, mesh, block_types, mp_policy)
    kwargs = fully_shard_kwargs(mesh, mp_policy)
    if loose_parameters(module):
        fully_shard(module, **kwargs)
        for name in STEP_METHODS:
            if getattr(type(module), name, None) is not getattr(L.LightningModule, name, None):
                register_fsdp_forward_method(module, name)
        return
    for root in forward_roots(module):
        fully_shard(root, **kwargs)


STEP_METHODS = ("training_step", "validation_step", "test_step", "predict_step")


def loose_parameters(module: nn.Module) -> list[str]:
    """Trainable parameters that no child's forward reaches: the LightningModule's own, and
    those held directly by containers (``ModuleList``, ``ModuleDict``, ``ParameterList``...)."""
    loose = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
    for name, child in module.named_children():
        if _is_container(child):
            loose += [f"{name}.{n}" for n in loose_parameters(child)]
    return loose


def forward_roots(module: nn.Module) -> list[nn.Module]:
    """Children (through containers) holding parameters outside any FSDP unit (frozen ones
    too: a LoRA model's frozen embedding is sharded like the rest)."""
    roots = []
    for child in module.children():
        if isinstance(child, FSDPModule):
            continue
        if _is_container(child):
            roots += forward_roots(child)
        elif _outside_units(child):
            roots.append(child)
    return roots


def _is_container(module: nn.Module) -> bool:
    return type(module).forward is nn.Module.forward


def _outside_units(module: nn.Module) -> list[nn.Parameter]:
    inside = {id(p) for m in module.modules() if isinstance(m, FSDPModule) for p in m.parameters()}
    return [p for p in module.parameters() if id(p) not in inside]


def check_groups_inside_units(module: nn.Module) -> None:
    """Refuse clipping groups that span FSDP units: their gradients are reduce-scattered (and
    so released) unit by unit, before a cross-unit norm could be known."""
    from lightning_dp.engine.groups import unit_groups

    clipper = clipper_of(module)
    unit_of = {p: unit for unit, params in unit_groups(module, list(clipper.group_of)).items() for p in params}
    for name, group in clipper.groups.items():
        units = sorted({unit_of[p] for p in group.params})
        if len(units) > 1:
            raise ValueError(
                f"dp_fsdp: clipping group {name!r} spans FSDP units {units}; each unit's gradient "
                "is reduce-scattered as soon as its backward ends, before the group's norm is "
                "known. Use groups inside one unit (clipping='unit' or 'layer')."
            )
