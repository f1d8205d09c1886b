"""Trainer(strategy="dp_fsdp", accelerator="cpu", devices=2): epsilon and resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_dp.accounting import epsilon

SCRIPT = Path(__file__).with_name("fsdp_trainer_run.py")


def _run(out: Path, max_steps: int, layout: str, ckpt: Path | None = None, *flags: str) -> dict:
    args = [sys.executable, str(SCRIPT), str(out), str(max_steps), layout] + ([str(ckpt)] if ckpt else []) + list(flags)
    done = subprocess.run(args, capture_output=True, text=True, timeout=400, cwd=out)
    # the accountant's convergence warnings would fill the message and hide the error
    errors = "\n".join(line for line in done.stderr.splitlines() if "WARNING:absl" not in line)
    assert done.returncode == 0, done.stdout[-2000:] + errors[-6000:]
    return json.loads((out / "result.json").read_text())


@pytest.mark.parametrize("layout", ["sharded", "full"])
def test_dp_fsdp_trains_logs_the_accountants_epsilon_and_resumes(tmp_path, layout):
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    full_dir.mkdir(), resumed_dir.mkdir()
    full = _run(full_dir, 6, layout)
    assert full["global_step"] == full["ledger_steps"] == 6
    assert full["self_check_pending"] is False  # the self-check ran, and passed
    assert full["groups"] == ["model", "model.blocks.0", "model.blocks.1"]  # one group per unit
    want = epsilon(noise_multiplier=full["sigma"], sample_rate=full["q"], steps=6, delta=full["delta"], accountant="rdp")
    assert full["epsilon"] == pytest.approx(want, rel=1e-9) and want <= 4.0
    assert full["logged"] == pytest.approx(want, rel=1e-6)

    checkpoint = next((full_dir / "ckpt").glob("*step=3*"))
    assert checkpoint.is_dir() == (layout == "sharded")  # a sharded directory or one full file
    resumed = _run(resumed_dir, 6, layout, checkpoint)
    assert resumed["global_step"] == resumed["ledger_steps"] == 6
    assert resumed["epsilon"] == full["epsilon"] and resumed["sigma"] == full["sigma"]
    a = torch.load(full_dir / "params.pt", weights_only=True)
    b = torch.load(resumed_dir / "params.pt", weights_only=True)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)


def test_dp_fsdp_self_check_refuses_a_loss_that_mixes_examples_before_any_step(tmp_path):
    args = [sys.executable, str(SCRIPT), str(tmp_path), "3", "sharded", "--mixing-loss"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert done.returncode != 0
    assert "SelfCheckError" in done.stderr and "loss mixes examples" in done.stderr
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "result.json").exists()


@pytest.mark.slow
def test_dp_fsdp_adaptive_thresholds_agree_across_ranks_and_resume(tmp_path):
    """Counts are summed over ranks with one noise draw (rank 0's), so every rank moves its
    thresholds identically; the joint release is charged; a resumed run continues them."""
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    full_dir.mkdir(), resumed_dir.mkdir()
    full = _run(full_dir, 6, "sharded", None, "--adaptive")
    ranks = [torch.load(full_dir / f"thresholds_rank{r}.pt") for r in range(2)]
    assert ranks[0] == ranks[1]
    assert all(h[-1] != h[0] for h in ranks[0].values())
    assert full["sigma_eff"] < full["sigma"] and full["ledger_sigma"] == [full["sigma_eff"]]
    want = epsilon(noise_multiplier=full["sigma_eff"], sample_rate=full["q"], steps=6, delta=full["delta"], accountant="rdp")
    assert full["epsilon"] == pytest.approx(want, rel=1e-9) and want <= 4.0

    resumed = _run(resumed_dir, 6, "sharded", next((full_dir / "ckpt").glob("*step=3*")), "--adaptive")
    assert resumed["epsilon"] == full["epsilon"]
    for r in range(2):
        assert torch.load(resumed_dir / f"thresholds_rank{r}.pt") == ranks[0]


@pytest.mark.slow
def test_dp_fsdp_compiled_blocks_train_like_eager(tmp_path):
    """compile=True: the first step eager, then every block compiled with the DP pass; with the
    same seeds the parameters match the eager run."""
    eager_dir, compiled_dir = tmp_path / "eager", tmp_path / "compiled"
    eager_dir.mkdir(), compiled_dir.mkdir()
    eager = _run(eager_dir, 4, "sharded")
    compiled = _run(compiled_dir, 4, "sharded", None, "--compile")
    assert compiled["epsilon"] == eager["epsilon"] and compiled["ledger_steps"] == 4
    assert eager["compiled_sites"] == 0 and compiled["compiled_sites"] == 6  # 3 per block
    a = torch.load(eager_dir / "params.pt", weights_only=True)
    b = torch.load(compiled_dir / "params.pt", weights_only=True)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
