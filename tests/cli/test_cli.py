"""The lightning-dp command: every recipe parses, bad values are refused clearly, one recipe runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightning_dp.cli import run as main
from lightning_dp.exporting import load

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))
FASHION = Path(__file__).parents[2] / "configs" / "fashion_mnist.yaml"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_recipe_parses_with_its_privacy_settings(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "class_path: lightning_dp.DPStrategy" in printed
    assert "class_path: lightning_dp.PrivacyAccountant" in printed
    assert "${" not in printed  # OmegaConf interpolations were resolved


def test_privacy_settings_are_reachable_from_the_command_line(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(FASHION), "--trainer.strategy.init_args.clip_fn", "abadi",
              "--trainer.strategy.init_args.max_grad_norm", "0.5", "--print_config"])
    printed = capsys.readouterr().out
    assert "clip_fn: abadi" in printed and "max_grad_norm: 0.5" in printed


def test_a_wrong_privacy_value_is_refused_by_name(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(FASHION), "--trainer.strategy.init_args.clip_fn", "hard"])
    assert exit_info.value.code != 0
    error = capsys.readouterr().err
    assert "clip_fn" in error and "hard" in error and "automatic" in error  # names the choices
    # the error is not drowned in the usage of every Trainer option (60+ lines before)
    assert len(error.splitlines()) < 20 and "--trainer.max_epochs" not in error
    assert "fit --help" in error


@pytest.fixture
def fashion_run(tmp_path):
    pytest.importorskip("matplotlib")
    if not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists():
        pytest.fail("Fashion-MNIST is missing: `apt-get install dataset-fashion-mnist` (.ci/run does).")
    return [
        "--config", str(FASHION), "--trainer.default_root_dir", str(tmp_path),
        "--trainer.max_steps", "3", "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1",
        "--trainer.enable_model_summary", "false",
        "--data.init_args.limit_train", "600", "--data.init_args.batch_size", "60",
    ]


def test_fashion_recipe_fits_reports_and_exports_end_to_end(fashion_run, tmp_path):
    cli = main(["fit", *fashion_run])
    trainer = cli.trainer
    assert trainer.global_step == 3
    report_dir = Path(trainer.log_dir)
    report = json.loads((report_dir / "privacy_report.json").read_text())
    card = report["card"]
    assert card["steps"] == 3 and card["dataset_size"] == 600 and card["delta"] == 1e-5
    assert 0 < card["epsilon"] <= 3.0
    assert [s for s, _ in report["history"]["epsilon"]] == [1, 2, 3]
    for name in ("privacy_report.md", "epsilon.png", "clipping.png"):
        assert (report_dir / name).stat().st_size > 0
    assert "val_acc" in trainer.callback_metrics and "val_f1" in trainer.callback_metrics

    checkpoint = report_dir / "checkpoints" / "last.ckpt"
    output = tmp_path / "model.pt2"
    main(["export", *fashion_run, "--ckpt_path", str(checkpoint), "--output", str(output)])
    program, exported_card = load(output)
    assert exported_card == card  # the card rebuilt from the checkpoint equals the live one
    model = cli.model.eval()
    images = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(images), model(images))


def test_help_says_what_the_tool_is_and_names_export(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    head = capsys.readouterr().out[:800]
    assert "differentially private" in head and "export --config" in head and "privacy card" in head
