"""``hardfocus_loss`` against the fp64 reference, on both implementations.

``impl="triton"`` runs the kernels compiled on a GPU, or in Triton's CPU interpreter.
"""

import pytest
import torch

from hardfocus_fused import HardFocusLoss, hardfocus_loss

from helpers import assert_matches_reference, device_for, grads_of, make_batch

METHODS = ["irdro", "midranking", "highranking", "lowranking", "uniform", "mean"]
IMPLS = ["torch", "triton"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("seq_reduction", ["mean", "sum"])
@pytest.mark.parametrize("method", METHODS)
def test_methods_match_reference(impl, method, seq_reduction, triton_device):
    # 5 sequences (one without targets, two padded), V and H multiples of no block size.
    h, w, b, labels = make_batch(5, 9, 37, 83, device=device_for(impl, triton_device), seed=1)
    assert_matches_reference(h, w, b, labels, method=method, seq_reduction=seq_reduction, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("bias", [True, False])
def test_options_match_reference(impl, shift, softcap, bias, triton_device):
    h, w, b, labels = make_batch(3, 10, 24, 70, device=device_for(impl, triton_device), seed=2, bias=bias)
    assert_matches_reference(h, w, b, labels, shift=shift, softcap=softcap, impl=impl, method="irdro", r=0.5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shift", [2, 3, 12])
def test_integer_shift(impl, shift, triton_device):
    """Cut Cross-Entropy's integer shift: position t is scored against labels[:, t + shift]
    (a shift past the sequence leaves no target at all)."""
    h, w, b, labels = make_batch(3, 10, 24, 70, device=device_for(impl, triton_device), seed=4)
    assert_matches_reference(h, w, b, labels, shift=shift, impl=impl, method="irdro", r=0.5)


@pytest.mark.parametrize("impl", IMPLS)
def test_ignore_index_may_be_a_vocabulary_id(impl, triton_device):
    """As in PyTorch (and Liger), ignore_index=5 skips the targets equal to 5."""
    h, w, b, labels = make_batch(
        3, 10, 24, 70, device=device_for(impl, triton_device), seed=5, ragged=False, dead=False
    )
    labels[:, ::3] = 5
    loss, stats = assert_matches_reference(h, w, b, labels, ignore_index=5, impl=impl, method="midranking")
    assert stats.n_tokens.tolist() == [(labels[i, 1:] != 5).sum().item() for i in range(3)]


@pytest.mark.parametrize("impl", IMPLS)
def test_a_batch_of_no_sequences(impl, triton_device):
    device = device_for(impl, triton_device)
    h, w, b, labels = make_batch(3, 6, 16, 40, device=device)
    empty_h = h[:0].detach().requires_grad_()
    for method in ("irdro", "midranking", "mean"):
        loss, stats = hardfocus_loss(empty_h, w, labels[:0], bias=b, method=method, impl=impl, return_stats=True)
        assert loss.item() == 0.0 and stats.weights.shape == (0,)
        gh, gw, gb = grads_of(loss, (empty_h, w, b))
        assert gh.shape == (0, 6, 16) and not gw.any() and not gb.any()


def test_softcap_keeps_fp32_precision_near_zero(triton_device):
    """A large soft-cap (tanh near 0): ``2 * sigmoid(2x) - 1`` lost 1e-7 absolute in tanh,
    c * 1e-7 in the logits (gradients 3e-5 off at c=1000); the expm1 form keeps fp32."""
    device = device_for("triton", triton_device)
    h, w, b, labels = make_batch(3, 9, 32, 80, device=device, seed=0)
    for impl in IMPLS:
        assert_matches_reference(
            h, w, b, labels, softcap=1000.0, impl=impl, method="irdro", r=0.5, tolerances=(1e-6, 2e-6)
        )


@pytest.mark.parametrize("impl", IMPLS)
def test_single_sequence(impl, triton_device):
    h, w, b, labels = make_batch(1, 7, 16, 33, device=device_for(impl, triton_device), seed=3)
    for method in ("irdro", "midranking", "lowranking"):
        loss, stats = assert_matches_reference(h, w, b, labels, method=method, impl=impl)
        assert stats.weights.tolist() == [1.0]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(impl, dtype, triton_device):
    # The reference sees the same low-precision-rounded inputs, in fp64.
    h, w, b, labels = make_batch(4, 12, 48, 96, dtype=dtype, device=device_for(impl, triton_device), seed=4)
    loss, _ = assert_matches_reference(h, w, b, labels, method="midranking", n1=0.25, n2=0.5, impl=impl)
    grads = grads_of(hardfocus_loss(h, w, labels, bias=b, impl=impl), (h, w, b))
    assert [g.dtype for g in grads] == [dtype] * 3


@pytest.mark.parametrize("impl", IMPLS)
def test_batch_without_targets_is_zero_not_nan(impl, triton_device):
    h, w, b, labels = make_batch(2, 5, 16, 20, device=device_for(impl, triton_device))
    labels[:] = -100
    for method in METHODS:
        loss, stats = hardfocus_loss(h, w, labels, bias=b, method=method, impl=impl, return_stats=True)
        assert loss.item() == 0.0
        assert stats.weights.abs().sum().item() == 0.0 and stats.n_tokens.sum().item() == 0
        for g in grads_of(loss, (h, w, b)):
            assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("impl", IMPLS)
def test_irdro_gradient_is_dro_objective_gradient(impl, triton_device):
    # sum_i w_i grad L_i with w = softmax(L / r) is the gradient of r log(mean exp(L / r)).
    r = 0.7
    h, w, b, labels = make_batch(6, 8, 32, 50, device=device_for(impl, triton_device), seed=5, dead=False)
    loss = hardfocus_loss(h, w, labels, bias=b, method="irdro", r=r, impl=impl)
    got = grads_of(loss, (h, w, b))
    h64, w64, b64 = (t.detach().double().requires_grad_() for t in (h, w, b))
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    logits = h64 @ w64.T + b64
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    seq = nll.sum(1) / (targets != -100).sum(1)
    objective = r * torch.log(torch.exp(seq / r).mean())
    want = torch.autograd.grad(objective, (h64, w64, b64))
    for g, ref in zip(got, want):
        torch.testing.assert_close(g.double(), ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_mean_method_is_huggingface_loss(impl, triton_device):
    h, w, b, labels = make_batch(3, 9, 20, 40, device=device_for(impl, triton_device), seed=6)
    loss = hardfocus_loss(h, w, labels, bias=b, method="mean", impl=impl)
    logits = (h @ w.T + b).float()
    hf = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 40), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, hf, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_frozen_head_gets_no_gradient(impl, triton_device):
    h, w, b, labels = make_batch(3, 8, 24, 40, device=device_for(impl, triton_device), seed=7)
    w_frozen = w.detach()
    loss = hardfocus_loss(h, w_frozen, labels, impl=impl)
    (g,) = torch.autograd.grad(loss, (h,))
    ref = hardfocus_loss(h, w, labels, impl="torch")
    (g_ref, _) = torch.autograd.grad(ref, (h, w))
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)


def test_module_matches_function():
    h, w, b, labels = make_batch(4, 6, 16, 30, seed=8)
    module = HardFocusLoss(method="midranking", n1=0.25, n2=0.5, impl="torch", return_stats=True)
    loss_m, stats_m = module(h, w, labels, b)
    loss_f, stats_f = hardfocus_loss(
        h, w, labels, bias=b, method="midranking", n1=0.25, n2=0.5, impl="torch", return_stats=True
    )
    assert torch.equal(loss_m, loss_f) and torch.equal(stats_m.weights, stats_f.weights)
    assert "midranking" in repr(module)


def test_implementations_agree(triton_device):
    h, w, b, labels = make_batch(4, 16, 64, 130, device=triton_device, seed=9)
    out = {}
    for impl in IMPLS:
        loss = hardfocus_loss(h, w, labels, bias=b, impl=impl)
        out[impl] = (loss, *grads_of(loss, (h, w, b)))
    for a, c in zip(out["torch"], out["triton"]):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)
