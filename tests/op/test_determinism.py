"""deterministic=True: atomic-free Triton backward, correct and bitwise reproducible."""

import pytest
import torch

from hardfocus_fused import hardfocus_loss, linear_cross_entropy
from hardfocus_fused.kernels import backward_fused as backward_module

from helpers import assert_matches_reference, device_for, grads_of, make_batch

# 3 x 13 tokens, 150 classes, 72 features: several token blocks, vocabulary tiles and
# hidden blocks at the interpreter's tile sizes, so every loop of both kernels runs.
SHAPE = dict(batch=3, seq=13, hidden=72, vocab=150)


@pytest.mark.parametrize(
    "options",
    [
        dict(method="irdro"),
        dict(method="midranking", n1=0.0, n2=0.5),
        dict(method="mean", softcap=5.0),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic_backward_matches_reference(options, dtype, triton_device):
    h, w, b, labels = make_batch(**SHAPE, dtype=dtype, device=triton_device, seed=4)
    assert_matches_reference(h, w, b, labels, impl="triton", deterministic=True, **options)


def test_deterministic_frozen_head(triton_device):
    h, w, b, labels = make_batch(**SHAPE, device=triton_device, seed=5)
    assert_matches_reference(h, w.detach(), b.detach(), labels, impl="triton", deterministic=True)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_two_runs_agree_bitwise(impl, triton_device):
    h, w, b, labels = make_batch(**SHAPE, device=device_for(impl, triton_device), seed=6)
    runs = [grads_of(hardfocus_loss(h, w, labels, bias=b, impl=impl, deterministic=True), (h, w, b)) for _ in range(2)]
    for first, second in zip(*runs):
        assert torch.equal(first, second)


@pytest.fixture
def backward_calls(monkeypatch):
    calls = []
    real = backward_module.deterministic_backward

    def spy(*args, **kwargs):
        calls.append(True)
        return real(*args, **kwargs)

    monkeypatch.setattr(backward_module, "deterministic_backward", spy)
    return calls


def test_default_follows_torch_deterministic_algorithms(backward_calls, triton_device):
    h, w, b, labels = make_batch(2, 5, 16, 20, device=triton_device, seed=7)
    linear_cross_entropy(h, w, labels, reduction="none", impl="triton").sum().backward()
    assert backward_calls == []
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        linear_cross_entropy(h, w, labels, reduction="none", impl="triton").sum().backward()
    finally:
        torch.use_deterministic_algorithms(previous)
    assert backward_calls == [True]
    linear_cross_entropy(h, w, labels, reduction="none", impl="triton", deterministic=False).sum().backward()
    assert backward_calls == [True]


def test_deterministic_must_be_bool():
    h, w, b, labels = make_batch(2, 5, 16, 20)
    with pytest.raises(TypeError, match="deterministic"):
        hardfocus_loss(h, w, labels, deterministic="yes")
