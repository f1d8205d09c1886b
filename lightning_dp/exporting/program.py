"""``export``: a trained model as a clean ``torch.export`` program with its privacy card.

Order of operations: copy the model (training state stays untouched), strip the DP machinery
from the copy, export it in eval mode, refuse a graph that still holds a DP op, then save the
``.pt2`` with the card inside it (``extra_files``) and beside it (``<path>.privacy.json``).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.export import Dim, ExportedProgram

from lightning_dp.engine import is_private, strip_private
from lightning_dp.exporting.card import privacy_card as card_of_trainer

#: Name of the privacy card inside the ``.pt2`` archive.
CARD_FILE = "privacy_card.json"
#: Source files of the DP machinery; a graph node traced through them is a DP op.
_DP_CODE = re.compile(r"lightning_dp[/\\](engine|rules)[/\\]")


def export(
    model: nn.Module,
    example_inputs: Tensor | tuple[Any, ...],
    path: str | Path,
    *,
    privacy_card: pl.Trainer | Mapping[str, Any] | None = None,
    dynamic_batch: bool = True,
    aoti_package: str | Path | None = None,
) -> ExportedProgram:
    """Export ``model`` without DP machinery and save it with its privacy card.

    Args:
        model: the trained model (a LightningModule or any module; private or already stripped).
        example_inputs: positional inputs of ``model.forward`` (a tensor or a tuple).
        path: the ``.pt2`` file; the card is also written to ``<path>.privacy.json``.
        privacy_card: the fitted Trainer (its card is built), a card dict, or None to take the
            Trainer the LightningModule is attached to.
        dynamic_batch: export dim 0 of every input tensor as a dynamic batch size (torch may
            still specialise it where the model requires).
        aoti_package: also compile the program ahead of time with AOTInductor into this
            package (needs a C++ compiler; load with ``torch._inductor.aoti_load_package``);
            its card is written to ``<aoti_package>.privacy.json``.

    Returns:
        The exported program (also loadable with :func:`load` or ``torch.export.load``).
    """
    card = _resolve_card(model, privacy_card)
    clean = copy.deepcopy(model)  # LightningModule.__getstate__ drops the trainer reference
    if is_private(clean):
        strip_private(clean)
    clean.eval()
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    with torch.no_grad():
        program = torch.export.export(clean, args, dynamic_shapes=_batch_shapes(args) if dynamic_batch else None)
    leftover = dp_nodes(program)
    if leftover:
        raise RuntimeError(
            f"export: the exported graph still calls DP ops {leftover}; strip_private should have "
            "removed them. Please report this with the model's definition."
        )
    text = json.dumps(card, indent=2, sort_keys=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, path, extra_files={CARD_FILE: text})
    card_path(path).write_text(text + "\n")
    if aoti_package is not None:
        torch._inductor.aoti_compile_and_package(program, package_path=str(aoti_package))
        card_path(aoti_package).write_text(text + "\n")
    return program


def load(path: str | Path) -> tuple[ExportedProgram, dict[str, Any]]:
    """Load an exported program and the privacy card stored inside it."""
    extra_files = {CARD_FILE: ""}
    program = torch.export.load(path, extra_files=extra_files)
    if not extra_files[CARD_FILE]:
        raise ValueError(f"{str(path)!r} holds no privacy card; it was not saved by lightning_dp.export.")
    return program, json.loads(extra_files[CARD_FILE])


def card_path(path: str | Path) -> Path:
    """Where the card is written beside the program: ``<path>.privacy.json``."""
    return Path(f"{path}.privacy.json")


def dp_nodes(program: ExportedProgram) -> list[str]:
    """Nodes, in the graph and its subgraphs, that come from lightning-dp's DP machinery.

    A node counts when its target is a lightning-dp op or an ``autograd.Function`` application,
    or when it was traced through the engine's or a rule's code (its stack trace says so).
    """
    found = []
    for owner, graph_module in program.graph_module.named_modules():
        for node in graph_module.graph.nodes:
            if node.op != "call_function":
                continue
            target = node.target
            name = f"{getattr(target, '__module__', '')}.{getattr(target, '__name__', target)}"
            traced_through_dp = _DP_CODE.search(node.meta.get("stack_trace") or "")
            if "lightning_dp" in name or "autograd_function_apply" in str(target) or traced_through_dp:
                found.append(f"{owner or '<root>'}:{node.name} ({name})")
    return found


def _resolve_card(model: nn.Module, card: pl.Trainer | Mapping[str, Any] | None) -> dict[str, Any]:
    if isinstance(card, pl.Trainer):
        return card_of_trainer(card)
    if isinstance(card, Mapping):
        return dict(card)
    trainer = getattr(model, "_trainer", None)
    if card is None and trainer is not None:
        return card_of_trainer(trainer)
    raise ValueError(
        f"export: privacy_card={card!r} and the model is attached to no Trainer, so the privacy "
        "guarantee is unknown. Pass privacy_card=trainer (after fit), a dict from "
        "lightning_dp.privacy_card(trainer), or one from privacy_card_from_checkpoint."
    )


def _batch_shapes(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Dim 0 of every tensor argument as an automatically-chosen dynamic dimension."""
    return tuple({0: Dim.AUTO} if isinstance(a, Tensor) and a.dim() > 0 else None for a in args)
