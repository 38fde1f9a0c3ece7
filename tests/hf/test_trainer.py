"""The stock transformers.Trainer trains a patched model, with gradient accumulation."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from hardfocus_fused import HardFocusCallback, apply_hardfocus  # noqa: E402

from helpers import assert_same_updates, state_of  # noqa: E402
from hf_models import Rows, sgd_args, tiny_model  # noqa: E402


def train(model, tmp_path, attach=False):
    args = sgd_args(tmp_path, 4, 2, dataloader_drop_last=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Rows())
    if attach:
        HardFocusCallback.attach(trainer)
    trainer.train()
    return trainer


def test_mean_trains_exactly_like_the_unpatched_model(tmp_path):
    model = tiny_model("llama")
    patched = apply_hardfocus(copy.deepcopy(model), method="mean", impl="torch")
    before = state_of(model)
    stock = train(model, tmp_path / "stock")
    ours = train(patched, tmp_path / "ours", attach=True)

    def losses(t):
        return [h["loss"] for h in t.state.log_history if "loss" in h]

    assert len(losses(ours)) == 2
    torch.testing.assert_close(losses(ours), losses(stock), rtol=1e-5, atol=1e-6)
    assert_same_updates(before, state_of(patched), state_of(model))


def test_weights_reach_the_logs(tmp_path):
    model = apply_hardfocus(tiny_model("gpt2"), method="irdro", r=0.5, impl="torch")
    before = [p.detach().clone() for p in model.parameters()]
    trainer = train(model, tmp_path, attach=True)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all(0.25 <= h["hardfocus/max_weight"] <= 1 and 1 <= h["hardfocus/ess"] <= 4 for h in logs)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
