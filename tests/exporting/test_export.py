"""export: a clean torch.export program equal to the trained model, with the accountant's card."""

from __future__ import annotations

import json

import pytest
import torch
from dp_fixtures import Classifier, toy_dataset, trainer
from torch.utils.data import DataLoader

import lightning_dp
from lightning_dp.engine import is_private
from lightning_dp.exporting import card_path, dp_nodes, load, privacy_card_from_checkpoint


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A Classifier trained privately for two epochs, with a checkpoint of the run."""
    torch.manual_seed(0)
    model = Classifier()
    accountant = lightning_dp.PrivacyAccountant(target_epsilon=2.0, accountant="pld")
    strategy = lightning_dp.DPStrategy(max_grad_norm={"net.0": 0.5, "net.2": 1.5}, seed=3)
    t = trainer(strategy, callbacks=[accountant], max_epochs=2)
    t.fit(model, DataLoader(toy_dataset(96), batch_size=12))
    ckpt = tmp_path_factory.mktemp("ckpt") / "run.ckpt"
    t.save_checkpoint(ckpt)
    return t, model, accountant, ckpt


def test_loaded_program_computes_what_the_trained_model_computes(fitted, tmp_path):
    t, model, _, _ = fitted
    path = tmp_path / "model.pt2"
    lightning_dp.export(model, torch.randn(4, 8), path, privacy_card=t)
    program, _ = load(path)
    x = torch.randn(7, 8)  # another batch size: the batch dimension is dynamic
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x))
    assert is_private(model)  # the training model keeps its DP machinery; a copy was stripped
    assert torch.export.load(path) is not None  # plain torch.export reads the archive


def test_exported_graph_has_no_dp_op_and_the_check_catches_one(fitted, tmp_path):
    t, model, _, _ = fitted
    program = lightning_dp.export(model, torch.randn(4, 8), tmp_path / "model.pt2", privacy_card=t)
    assert dp_nodes(program) == []
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert targets == {"aten.linear.default", "aten.tanh.default"}
    # negative control: the private model exported as is (training mode) runs through the rules
    model.train()
    raw = torch.export.export(model, (torch.randn(4, 8),))
    assert dp_nodes(raw)


def test_card_matches_the_accountant_inside_and_beside_the_program(fitted, tmp_path):
    t, model, accountant, _ = fitted
    path = tmp_path / "model.pt2"
    lightning_dp.export(model, torch.randn(4, 8), path, privacy_card=t)
    _, card = load(path)
    assert card == json.loads(card_path(path).read_text())
    private = t.strategy.private
    assert card["epsilon"] == pytest.approx(accountant.epsilon, rel=1e-12)
    assert card["epsilon"] <= 2.0
    assert card["delta"] == accountant.delta and card["accountant"] == "pld"
    assert card["noise_multiplier"] == private.privacy.noise_multiplier
    assert card["steps"] == private.ledger.steps == t.global_step
    assert card["sample_rate"] == pytest.approx(12 / 96) and card["dataset_size"] == 96
    assert card["thresholds"] == {"net.0": 0.5, "net.2": 1.5}
    assert card["sensitivity"] == pytest.approx((0.5**2 + 1.5**2) ** 0.5)
    assert (card["clipping"], card["clip_fn"]) == ("layer", "abadi")
    assert card["neighbouring_relation"] == "add/remove one training example"
    assert card["torch_version"] == torch.__version__


def test_card_from_a_checkpoint_equals_the_live_card(fitted):
    t, _, _, ckpt = fitted
    fresh = Classifier()
    checkpoint = torch.load(ckpt, weights_only=False)
    fresh.load_state_dict(checkpoint["state_dict"])
    from_ckpt = privacy_card_from_checkpoint(checkpoint, fresh, t.strategy.private.privacy)
    assert from_ckpt == lightning_dp.privacy_card(t)


def test_export_without_a_known_guarantee_is_refused(tmp_path):
    with pytest.raises(ValueError, match="privacy_card=None"):
        lightning_dp.export(torch.nn.Linear(3, 2), torch.randn(2, 3), tmp_path / "m.pt2")


@pytest.mark.slow
def test_aoti_package_computes_what_the_trained_model_computes(fitted, tmp_path):
    t, model, _, _ = fitted
    package = tmp_path / "model.aoti.pt2"
    lightning_dp.export(model, torch.randn(4, 8), tmp_path / "model.pt2", privacy_card=t, aoti_package=package)
    compiled = torch._inductor.aoti_load_package(str(package))
    x = torch.randn(6, 8)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
    assert json.loads(card_path(package).read_text()) == lightning_dp.privacy_card(t)


def test_card_of_an_adaptive_run_records_the_counts_and_final_thresholds(tmp_path):
    torch.manual_seed(0)
    model = Classifier()
    accountant = lightning_dp.PrivacyAccountant(target_epsilon=2.0, accountant="rdp")
    strategy = lightning_dp.DPStrategy(thresholds="adaptive", seed=3)
    t = trainer(strategy, callbacks=[accountant], max_epochs=1)
    t.fit(model, DataLoader(toy_dataset(96), batch_size=12))
    ckpt = tmp_path / "run.ckpt"
    t.save_checkpoint(ckpt)
    live = lightning_dp.privacy_card(t)
    private = t.strategy.private
    assert live["thresholds_mode"] == "adaptive"
    assert live["count_noise_multiplier"] == private.count_noise_multiplier > 0
    assert live["thresholds"] == lightning_dp.group_thresholds(model) != {"net.0": 1.0, "net.2": 1.0}
    assert live["epsilon"] == pytest.approx(accountant.epsilon, rel=1e-12)
    saved = privacy_card_from_checkpoint(
        torch.load(ckpt, weights_only=False), Classifier(), strategy.private.privacy
    )
    assert saved["thresholds"] == pytest.approx(live["thresholds"])
    assert saved["count_noise_multiplier"] == live["count_noise_multiplier"]


def test_card_records_which_parameters_were_trained(tmp_path):
    """A partly frozen model (as under LoRA): the card lists only the clipped and noised
    parameters, live and from the checkpoint."""
    torch.manual_seed(0)
    model = Classifier()
    model.net[0].requires_grad_(False)  # the frozen "base"
    accountant = lightning_dp.PrivacyAccountant(target_epsilon=2.0, accountant="rdp")
    strategy = lightning_dp.DPStrategy(seed=3)
    t = trainer(strategy, callbacks=[accountant], max_epochs=1)
    t.fit(model, DataLoader(toy_dataset(96), batch_size=12))
    live = lightning_dp.privacy_card(t)
    assert live["trained_parameters"] == ["net.2.bias", "net.2.weight"]
    assert live["trained_parameter_count"] == model.net[2].weight.numel() + model.net[2].bias.numel()
    assert live["frozen_parameter_count"] == sum(p.numel() for p in model.net[0].parameters()) > 0
    ckpt = tmp_path / "run.ckpt"
    t.save_checkpoint(ckpt)
    fresh = Classifier()
    fresh.net[0].requires_grad_(False)
    saved = privacy_card_from_checkpoint(torch.load(ckpt, weights_only=False), fresh, strategy.private.privacy)
    assert saved == live


class UnfreezeAtEpochOne(Classifier):
    def __init__(self) -> None:
        super().__init__()
        self.net[0].requires_grad_(False)

    def on_train_epoch_start(self):
        if self.current_epoch == 1:
            self.net[0].requires_grad_(True)


@pytest.mark.parametrize("after", ["unchanged", "frozen again"])
def test_card_lists_a_layer_unfrozen_part_way_from_the_checkpoint_too(tmp_path, after):
    """A probe built the card from a checkpoint with the layer frozen as the model's __init__
    leaves it: it listed only net.2, with sensitivity C instead of C sqrt(2). The strategy now
    records what every plan of the run trained, and the thresholds in force."""
    torch.manual_seed(0)
    model = UnfreezeAtEpochOne()
    strategy = lightning_dp.DPStrategy(noise_multiplier=1.0, seed=3)
    t = trainer(strategy, callbacks=[lightning_dp.PrivacyAccountant(delta=1e-3, accountant="rdp")], max_epochs=2)
    t.fit(model, DataLoader(toy_dataset(96), batch_size=24))
    if after == "frozen again":  # a layer trained at some step stays trained
        model.net[0].requires_grad_(False)
    live = lightning_dp.privacy_card(t)
    assert live["trained_parameters"] == ["net.0.bias", "net.0.weight", "net.2.bias", "net.2.weight"]
    assert live["frozen_parameter_count"] == 0
    assert live["sensitivity"] == pytest.approx(2**0.5)
    t.save_checkpoint(tmp_path / "run.ckpt")
    saved = privacy_card_from_checkpoint(torch.load(tmp_path / "run.ckpt", weights_only=False),
                                         UnfreezeAtEpochOne(), strategy.private.privacy)
    assert saved == live
