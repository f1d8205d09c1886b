"""The training step of each benchmarked case, on any workload (model, inputs, targets).

Every case computes the same step: zero grads, forward, per-example cross-entropy summed over
the batch, backward, optimizer step. Private cases clip each example's gradient to C and add
no noise, so all of them compute ``sum_i clip(g_i)`` on the same weights and batch (noise is
one ``randn`` per parameter, the same for every engine):

  non-private            plain model
  non-private-compiled   torch.compile(model)
  ldp-layer|unit|flat    lightning_dp.make_private(clipping=...), eager
  ldp-layer|flat-compiled  make_private, then lightning_dp.compile (clipping fused by inductor)
  opacus-hooks           Opacus PrivacyEngine, grad_sample_mode="hooks" (per-example grads, flat)
  opacus-ghost           Opacus PrivacyEngine, grad_sample_mode="ghost" (ghost norms, two backwards)
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

CASES = (
    "non-private", "non-private-compiled", "ldp-layer", "ldp-unit", "ldp-flat",
    "ldp-layer-compiled", "ldp-flat-compiled", "opacus-hooks", "opacus-ghost",
)


def unavailable(cases: list[str]) -> dict[str, str]:
    """Cases this environment cannot run, each with the reason (printed, then skipped)."""
    reasons = {}
    if importlib.util.find_spec("opacus") is None:
        reasons.update({c: "opacus is not installed (pip install opacus; it is not a lightning-dp "
                           "dependency)" for c in cases if c.startswith("opacus")})
    if any(c.startswith("ldp-") and c.endswith("-compiled") for c in cases):
        import lightning_dp

        if not hasattr(lightning_dp, "compile"):
            reasons.update({c: "this lightning_dp has no lightning_dp.compile" for c in cases
                            if c.startswith("ldp-") and c.endswith("-compiled")})
    return reasons


def build_step(job: dict, model: Any, inputs: Any, targets: Any) -> tuple[Callable[[], None], Any]:
    """The closure for one training step of ``job['case']`` and the (possibly wrapped) model."""
    import torch
    from models import per_example_loss

    case, clip = job["case"], job["max_grad_norm"]
    opt_cls = torch.optim.Adam if job["optimizer"] == "adam" else torch.optim.SGD
    optimizer = opt_cls(model.parameters(), lr=1e-4)
    trained = model
    if case == "non-private-compiled":
        trained = torch.compile(model)
    elif case.startswith("ldp-"):
        import lightning_dp

        clipping = case.removeprefix("ldp-").removesuffix("-compiled")
        lightning_dp.make_private(model, clipping=clipping, max_grad_norm=clip,
                                  norm_method=job.get("norm_method", "auto"))
        if case.endswith("-compiled"):  # one eager step first, as the strategies run
            per_example_loss(model(inputs), targets).sum().backward()
            model.zero_grad(set_to_none=True)
            trained = lightning_dp.compile(model)
    elif case.startswith("opacus-"):
        return _opacus_step(job, model, optimizer, inputs, targets)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        per_example_loss(trained(inputs), targets).sum().backward()
        optimizer.step()

    return step, model


def _opacus_step(job: dict, model: Any, optimizer: Any, inputs: Any, targets: Any):
    import torch
    from models import per_example_loss
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(inputs, targets), batch_size=inputs.shape[0])  # unused
    common = dict(optimizer=optimizer, data_loader=loader, noise_multiplier=0.0,
                  max_grad_norm=job["max_grad_norm"], loss_reduction="sum", poisson_sampling=False)
    if job["case"] == "opacus-hooks":
        model, optimizer, _ = PrivacyEngine().make_private(module=model, grad_sample_mode="hooks", **common)

        def hooks_step() -> None:
            optimizer.zero_grad(set_to_none=True)
            per_example_loss(model(inputs), targets).sum().backward()
            optimizer.step()

        return hooks_step, model
    # Ghost clipping runs two backwards: the wrapped criterion's loss.backward() does the norm
    # pass, then re-weights the per-example losses by the clip factors and backpropagates again.
    # Its loss must have reduction "sum" to match loss_reduction.
    criterion = torch.nn.CrossEntropyLoss(reduction="sum")
    gsm, dp_opt, dp_loss, _ = PrivacyEngine().make_private(
        module=model, criterion=criterion, grad_sample_mode="ghost", **common)

    def ghost_step() -> None:
        dp_opt.zero_grad(set_to_none=True)
        logits = gsm(inputs)
        # for sequences, shape=[B, T, V] makes the wrapper sum token losses per sequence
        shape = {"shape": logits.shape} if logits.dim() == 3 else {}
        dp_loss(logits.flatten(0, -2), targets.flatten(), **shape).backward()
        dp_opt.step()

    return ghost_step, gsm
