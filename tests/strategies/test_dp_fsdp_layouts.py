"""``dp_fsdp`` on the layouts users write, on 2 gloo ranks through the Trainer: blocks in a
``ModuleList`` with a parameter on the LightningModule, and a tiny HF Llama with peft LoRA.

Each run trains 3 noisy steps. Checked: the first step's per-example group norms on each rank
equal a one-process private model's on that rank's Poisson batch (with norms above the
threshold, so clipping acts); the replicas end equal; a step has exactly plain FSDP2's
collectives plus one integer all-reduce (the ranks agreeing on the micro-batch count)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lightning_dp as ldp

SCRIPT = Path(__file__).with_name("fsdp_layouts_run.py")
sys.path.insert(0, str(SCRIPT.parent))
from fsdp_layouts_run import MODELS  # noqa: E402

NEEDS = {"modulelist": (), "lora_llama": ("transformers", "peft")}


@pytest.mark.parametrize("kind", ["modulelist", "lora_llama"])
def test_dp_fsdp_trains_the_layout_exactly_with_plain_fsdp_collectives(tmp_path, kind):
    missing = [m for m in NEEDS[kind] if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"needs {missing}")
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), kind], capture_output=True,
                          text=True, timeout=400, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]

    for rank in ranks:
        assert rank["self_check_pending"] is False  # the collective self-check ran and passed
        torch.manual_seed(0)
        module = MODELS[kind]()
        module.load_state_dict(torch.load(tmp_path / "initial.pt", weights_only=True))
        ldp.make_private(module, clipping=rank["groups"], max_grad_norm=0.1)
        module.training_step(rank["batch"]).sum().backward()
        want = ldp.group_norms(module)
        assert set(want) == set(rank["norms"]) and len(want) >= 2
        for group, norms in want.items():
            torch.testing.assert_close(rank["norms"][group], norms, rtol=1e-4, atol=1e-6, msg=group)
        assert max(float(n.max()) for n in want.values()) > 0.1

    for name, value in ranks[0]["params"].items():
        torch.testing.assert_close(ranks[1]["params"][name], value, rtol=0, atol=0, msg=name)
    trainable = {n for n, p in MODELS[kind]().named_parameters() if p.requires_grad}
    initial = torch.load(tmp_path / "initial.pt", weights_only=True)
    assert all(not torch.equal(ranks[0]["params"][n], initial[n]) for n in trainable)  # all trained

    for rank in ranks:
        plain = dict(rank["plain_comms"])
        plain["c10d.allreduce_"] = plain.get("c10d.allreduce_", 0) + 1
        assert rank["dp_comms"] == plain
