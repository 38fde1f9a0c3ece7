"""Edge shapes and extreme values, on both implementations, against the fp64 reference."""

import pytest
import torch

from hardfocus_fused import hardfocus_loss

from helpers import assert_matches_reference, device_for, grads_of, make_batch

IMPLS = ["torch", "triton"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "batch,seq,hidden,vocab",
    [
        (2, 5, 16, 1),  # V = 1: every NLL is 0
        (3, 2, 13, 17),  # sequences of length 2 with shift: one target each; H not a multiple of 16
        (2, 6, 1, 9),  # H = 1
    ],
)
def test_edge_shapes(impl, batch, seq, hidden, vocab, triton_device):
    h, w, b, labels = make_batch(
        batch, seq, hidden, vocab, device=device_for(impl, triton_device), ragged=False, dead=False
    )
    assert_matches_reference(h, w, b, labels, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_length_one_sequences_have_no_target(impl, triton_device):
    h, w, b, labels = make_batch(3, 1, 8, 10, device=device_for(impl, triton_device), ragged=False, dead=False)
    loss, stats = hardfocus_loss(h, w, labels, bias=b, impl=impl, return_stats=True)
    assert loss.item() == 0.0 and stats.n_tokens.tolist() == [0, 0, 0]
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads_of(loss, (h, w, b)))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("r", [1e-3, 1e6])
def test_extreme_temperatures(impl, r, triton_device):
    h, w, b, labels = make_batch(5, 8, 16, 30, device=device_for(impl, triton_device), seed=21)
    loss, stats = assert_matches_reference(h, w, b, labels, impl=impl, method="irdro", r=r)
    live = stats.n_tokens > 0
    if r < 1:  # (nearly) one-hot on the largest loss
        assert stats.weights.argmax() == stats.seq_loss.argmax() and stats.weights.max().item() > 0.99
    else:  # uniform over the sequences with targets
        torch.testing.assert_close(stats.weights[live], torch.full_like(stats.weights[live], 1 / int(live.sum())))


@pytest.mark.parametrize("impl", IMPLS)
def test_large_logits_do_not_overflow(impl, triton_device):
    h, w, b, labels = make_batch(3, 8, 16, 40, device=device_for(impl, triton_device), seed=22)
    with torch.no_grad():
        h *= 100  # logits in the hundreds: exp() would overflow without the running max
    loss, _ = assert_matches_reference(h, w, b, labels, impl=impl, method="midranking")
    assert torch.isfinite(loss)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("method", ["irdro", "midranking", "mean"])
def test_non_finite_hidden_gives_nan_loss(impl, method, triton_device):
    h, w, b, labels = make_batch(3, 8, 16, 40, device=device_for(impl, triton_device), seed=23)
    with torch.no_grad():
        h[1, 2, 0] = float("nan")  # a position with a target
    loss = hardfocus_loss(h, w, labels, bias=b, impl=impl, method=method)
    assert torch.isnan(loss)


@pytest.mark.parametrize("impl", IMPLS)
def test_mixed_dtypes_as_autocast_produces(impl, triton_device):
    # bf16 hidden states with an fp32 head: each gradient comes back in its input's dtype.
    h, w, b, labels = make_batch(3, 10, 24, 50, device=device_for(impl, triton_device), seed=24)
    h16 = h.detach().bfloat16().requires_grad_()
    assert_matches_reference(h16, w, b, labels, impl=impl)
    loss = hardfocus_loss(h16, w, labels, bias=b, impl=impl)
    assert [g.dtype for g in grads_of(loss, (h16, w))] == [torch.bfloat16, torch.float32]


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_inputs(impl, triton_device):
    h, w, b, labels = make_batch(3, 10, 24, 50, device=device_for(impl, triton_device), seed=25)
    h_strided = h.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    w_strided = w.detach().T.contiguous().T.requires_grad_()
    assert not h_strided.is_contiguous() and not w_strided.is_contiguous()
    assert_matches_reference(h_strided, w_strided, b, labels, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("deterministic", [False, True])
def test_confident_predictions_keep_their_gradient_precision(impl, deterministic, triton_device):
    """With p_target near 1, dloss/dz_target = p_t - 1 is small; computed as
    exp(z_t - lse) - 1 it would carry the rounding of lse (2e-6 at lse ~ 30), a relative
    error near 1e-3 here.  With one token, grad_bias at the target column is exactly that
    entry: it must keep fp32 precision (the relative error is about 1e-6)."""
    device = device_for(impl, triton_device)
    gen = torch.Generator().manual_seed(5)
    size, vocab = 16, 200
    for target in (3, 77, 199):
        w = torch.randn(vocab, size, generator=gen) * 0.01
        h = torch.randn(1, 1, size, generator=gen)
        b = 18.0 + torch.randn(vocab, generator=gen) * 0.5
        b[target] = 30.0  # lse ~ 30, 1 - p_t ~ 1e-3
        labels = torch.tensor([[target]])
        b64 = b.double().requires_grad_()
        ref = torch.nn.functional.cross_entropy(h.double()[0] @ w.double().T + b64, labels[0])
        ref_grad = torch.autograd.grad(ref, b64)[0][target]
        assert -1e-2 < ref_grad.item() < -1e-4

        b = b.to(device).requires_grad_()
        loss = hardfocus_loss(
            h.to(device), w.to(device), labels.to(device), bias=b, shift=False, impl=impl, deterministic=deterministic
        )
        grad = torch.autograd.grad(loss, b)[0][target].double().cpu()
        assert abs(grad - ref_grad) / abs(ref_grad) < 2e-5, (target, grad.item(), ref_grad.item())
