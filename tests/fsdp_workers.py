"""Rank bodies for the FSDP tests (importable, so that spawn can pickle them)."""

from __future__ import annotations

import torch
from fsdp_models import Block, TinyTransformer, per_example_loss
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy

import lightning_dp as ldp
from lightning_dp.noise import add_noise_and_normalize, make_noise_generator
from lightning_dp.strategies.fsdp_sharding import shard_for_dp, sum_gradients_across_ranks

BATCH, SEQ = 6, 7


def batch() -> torch.Tensor:
    return torch.randint(0, 17, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))


def sharded_private_model(world_size: int, clipping, max_grad_norm: float = 0.5, mp_policy=None):
    torch.manual_seed(0)
    model = TinyTransformer()
    shard_for_dp(model, init_device_mesh("cpu", (world_size,)), [Block], mp_policy)
    sum_gradients_across_ranks(model)
    return ldp.make_private(model, clipping=clipping, max_grad_norm=max_grad_norm)


def clipped_sum_on_my_half(rank: int, world_size: int, clippings, out: str) -> None:
    """Each rank takes its contiguous share of the batch; save full grads and group norms.

    ``"unit-bf16"`` runs per-unit clipping under FSDP2 mixed precision (bf16 compute, fp32
    reduction)."""
    bf16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for clipping in clippings:
        mixed = clipping.endswith("-bf16")
        model = sharded_private_model(world_size, clipping.removesuffix("-bf16"), mp_policy=bf16 if mixed else None)
        share = BATCH // world_size
        per_example_loss(model, batch()[rank * share : (rank + 1) * share]).sum().backward()
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        torch.save({"grads": grads, "norms": ldp.group_norms(model)}, f"{out}/{clipping}-rank{rank}.pt")


def noise_on_zero_gradients(rank: int, world_size: int, sigma: float, expected: float, steps: int, out: str) -> None:
    """Zero clipped sums: what remains after each step is the noise, sharded across ranks."""
    model = sharded_private_model(world_size, "unit")
    generator = make_noise_generator(123, rank=rank)
    sens = ldp.sensitivity(model)
    samples = []
    for _ in range(steps):
        for p in model.parameters():
            p.grad = None
        per_example_loss(model, batch()[:0]).sum().backward()  # an empty batch on every rank
        add_noise_and_normalize(model.parameters(), noise_multiplier=sigma, sensitivity=sens,
                                expected_batch_size=expected, generator=generator)
        samples.append(torch.cat([p.grad.full_tensor().flatten() for p in model.parameters()]))
    torch.save({"samples": torch.stack(samples), "sensitivity": sens}, f"{out}/rank{rank}.pt")


def count_collectives(rank: int, world_size: int, out: str) -> None:
    """Collectives in one forward+backward: plain FSDP2 vs private FSDP2 ("unit", "layer")."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.debug import CommDebugMode

    counts = {}
    for clipping in (None, "unit", "layer"):
        if clipping is None:
            torch.manual_seed(0)
            model = TinyTransformer()
            mesh = init_device_mesh("cpu", (world_size,))
            for block in model.blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
            sum_gradients_across_ranks(model)
        else:
            model = sharded_private_model(world_size, clipping)
        per_example_loss(model, batch()[:3]).sum().backward()  # warm-up
        with CommDebugMode() as comm:
            per_example_loss(model, batch()[:3]).sum().backward()
        counts[str(clipping)] = {str(k): v for k, v in comm.get_comm_counts().items()}
    torch.save(counts, f"{out}/counts-rank{rank}.pt")


def self_checks(rank: int, world_size: int, out: str) -> None:
    """``self_check_across_ranks`` with examples on every rank, on rank 1 only, on none, and
    with a loss that mixes examples (scaled by the batch's mean loss)."""
    model = sharded_private_model(world_size, "unit")
    per_example = lambda m, ids: per_example_loss(m, ids)  # noqa: E731
    share = BATCH // world_size
    mine = batch()[rank * share : (rank + 1) * share]
    results = {
        "every rank": ldp.self_check_across_ranks(model, per_example, mine),
        "rank 1 only": ldp.self_check_across_ranks(model, per_example, mine if rank == 1 else mine[:0]),
        "no rank": ldp.self_check_across_ranks(model, per_example, mine[:0]),
    }
    saved = {k: None if r is None else (r.engine, r.reference, r.examples) for k, r in results.items()}
    mixing = lambda m, ids: per_example_loss(m, ids) * per_example_loss(m, ids).detach().mean()  # noqa: E731
    try:
        ldp.self_check_across_ranks(model, mixing, mine)
        saved["mixing"] = "passed"
    except ldp.SelfCheckError as error:
        saved["mixing"] = str(error)
    torch.save(saved, f"{out}/self-check-rank{rank}.pt")


def all_engine_checks(rank: int, world_size: int, out: str, sigma: float, expected: float, steps: int) -> None:
    """One spawn for every engine-level FSDP check (process start-up dominates their cost)."""
    self_checks(rank, world_size, out)
    clipped_sum_on_my_half(rank, world_size, ["unit", "layer", "unit-bf16"], out)
    count_collectives(rank, world_size, out)
    noise_on_zero_gradients(rank, world_size, sigma, expected, steps, out)


def compiled_blocks_on_my_half(rank: int, world_size: int, out: str) -> None:
    """Per-unit clipping with each FSDP block's forward compiled (the DP pass inside)."""
    from lightning_dp.compiling import compile_submodules
    from lightning_dp.strategies.fsdp_sharding import nested_units

    model = sharded_private_model(world_size, "unit")
    compile_submodules(model, nested_units(model), dynamic=False)
    share = BATCH // world_size
    for _ in range(2):  # the second step reuses the compiled blocks
        for p in model.parameters():
            p.grad = None
        per_example_loss(model, batch()[rank * share : (rank + 1) * share]).sum().backward()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    torch.save({"grads": grads, "norms": ldp.group_norms(model)}, f"{out}/compiled-rank{rank}.pt")
