"""Global-batch weights across gradient-accumulation micro-batches."""

import copy

import pytest
import torch
from torch import nn

from hardfocus_fused import hardfocus_loss
from hardfocus_fused.weighting.accumulate import AccumulatedIRDRO, TwoPassRanking

from helpers import assert_same_updates, state_of

H_IN, H, V, T, B = 5, 8, 19, 6, 9


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(H_IN, H)
        self.head = nn.Linear(H, V)

    def forward(self, x, labels, method, **options):
        return hardfocus_loss(
            self.proj(x), self.head.weight, labels, bias=self.head.bias, method=method, impl="torch", **options
        )


def batch(seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H_IN, generator=gen) * 3
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[2] = -100  # a sequence without targets
    labels[5, :3] = -100
    return x, labels


def grads(model):
    return [p.grad.clone() for p in model.parameters()]


# Micro-batches of 4, 2 and 3 sequences; the order puts a larger loss late, so the running max moves.
SPLITS = [slice(0, 4), slice(4, 6), slice(6, 9)]


def test_accumulated_irdro_equals_one_big_batch():
    x, labels = batch()
    whole = Head()
    whole(x, labels, "irdro", r=0.3).backward()
    model = Head()
    rule = AccumulatedIRDRO(model.parameters(), r=0.3)
    for _step in range(2):  # two optimizer steps: reset() must start over
        for p in model.parameters():
            p.grad = None
        rule.reset()
        for part in SPLITS:
            model(x[part], labels[part], rule).backward()
    for g, r in zip(grads(model), grads(whole)):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)


def test_per_micro_batch_weights_are_a_different_objective():
    x, labels = batch()
    whole = Head()
    whole(x, labels, "irdro", r=0.3).backward()
    model = Head()
    for part in SPLITS:
        (model(x[part], labels[part], "irdro", r=0.3) / len(SPLITS)).backward()
    assert any(not torch.allclose(g, r, rtol=1e-3) for g, r in zip(grads(model), grads(whole)))


@pytest.mark.parametrize("method", ["midranking", "highranking", "lowranking"])
def test_two_pass_ranking_equals_one_big_batch(method):
    x, labels = batch(seed=2)
    whole = Head()
    whole(x, labels, method, n1=0.25, n2=0.25).backward()
    model = Head()
    rule = TwoPassRanking(method, n1=0.25, n2=0.25)
    with torch.no_grad(), rule.observing():
        for part in SPLITS:
            model(x[part], labels[part], rule)
    for part in SPLITS:
        model(x[part], labels[part], rule).backward()
    for g, r in zip(grads(model), grads(whole)):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)
    with pytest.raises(RuntimeError, match="more micro-batches"):
        model(x[SPLITS[0]], labels[SPLITS[0]], rule)


def test_trainer_with_accumulated_irdro_equals_one_batch(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from hardfocus_fused import apply_hardfocus
    from hardfocus_fused.hf.trainer import AccumulationCallback

    from hf_models import Rows, sgd_args

    def run(model, batch_size, accumulation, callbacks):
        args = sgd_args(tmp_path / f"ga{accumulation}", batch_size, accumulation)
        transformers.Trainer(model=model, args=args, train_dataset=Rows(), callbacks=callbacks).train()
        return model

    from hf_models import tiny_model

    base = tiny_model("llama")
    one = run(apply_hardfocus(copy.deepcopy(base), method="irdro", r=0.5, impl="torch"), 8, 1, [])
    model = copy.deepcopy(base)
    rule = AccumulatedIRDRO(model.parameters(), r=0.5)
    apply_hardfocus(model, method=rule, impl="torch")
    four = run(model, 2, 4, [AccumulationCallback(rule)])
    assert_same_updates(state_of(base), state_of(four), state_of(one))
