"""Per-token log-probabilities, entropy and temperature from the fused op, for RL: against
an fp64 reference that materialises the (tempered) logits, with arbitrary signed upstream
gradients mixing log-probs, entropy and log-sum-exp, on every implementation and backward
strategy."""

import pytest
import torch

from hardfocus_fused import linear_cross_entropy
from hardfocus_fused.op import registration

from helpers import TOLERANCES, device_for, grads_of, make_batch, spy_on_launches
from reference import reference_logprobs, rel_err

# (impl, backward_impl, deterministic)
PATHS = [("torch", "auto", None), ("triton", "fused", False), ("triton", "fused", True), ("triton", "matmul", False)]


@pytest.mark.parametrize("impl,backward_impl,deterministic", PATHS)
@pytest.mark.parametrize("temperature,softcap", [(1.0, None), (0.7, None), (1.6, 4.0)])
def test_logprobs_entropy_and_lse_with_signed_upstream_gradients(
    impl, backward_impl, deterministic, temperature, softcap, triton_device
):
    device = device_for(impl, triton_device)
    h, w, b, labels = make_batch(3, 10, 24, 70, device=device, seed=11)
    out = linear_cross_entropy(
        h,
        w,
        labels,
        bias=b,
        shift=True,
        reduction="none",
        return_entropy=True,
        return_lse=True,
        temperature=temperature,
        softcap=softcap,
        impl=impl,
        backward_impl=backward_impl,
        deterministic=deterministic,
    )
    logp, entropy, lse = reference_logprobs(h, w, labels, b, temperature, softcap)
    assert rel_err(-out.loss, logp) <= 1e-5 and rel_err(out.entropy, entropy) <= 1e-5
    assert rel_err(out.lse, lse) <= 1e-5
    gen = torch.Generator().manual_seed(12)
    g_logp, g_ent, g_lse = (torch.randn(labels.shape, generator=gen, dtype=torch.float64) for _ in range(3))
    ours = grads_of(
        (-out.loss * g_logp.to(device) + out.entropy * g_ent.to(device) + out.lse * g_lse.to(device)).sum(), (h, w, b)
    )
    ref = grads_of((logp * g_logp.to(device) + entropy * g_ent.to(device) + lse * g_lse.to(device)).sum(), (h, w, b))
    for g, r in zip(ours, ref):
        assert rel_err(g, r) <= 1e-4


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_entropy_alone_backpropagates(impl, triton_device):
    """An entropy bonus without the log-probs in the loss: only the entropy's gradient."""
    device = device_for(impl, triton_device)
    h, w, b, labels = make_batch(2, 8, 16, 40, device=device, seed=13)
    out = linear_cross_entropy(h, w, labels, reduction="none", bias=b, shift=True, return_entropy=True, impl=impl)
    _, entropy, _ = reference_logprobs(h, w, labels, b)
    for g, r in zip(grads_of(out.entropy.sum(), (h, w, b)), grads_of(entropy.sum(), (h, w, b))):
        assert rel_err(g, r) <= 1e-4


def test_entropy_across_vocabulary_splits(triton_device):
    """The forward's per-split sums merge into the entropy (several splits and tiles)."""
    from hardfocus_fused.kernels.config import KernelConfig
    from hardfocus_fused.op.dispatch import token_terms

    h, w, b, labels = make_batch(2, 9, 16, 100, device=triton_device, seed=14, ragged=False, dead=False)
    targets = labels.reshape(-1)
    config = KernelConfig(block_n=16, block_v=16, block_h=16, vocab_splits=3)
    out = token_terms(h.reshape(-1, 16), w, targets, b, -100, None, "triton", kernel_config=config, entropy=True)
    logp = torch.log_softmax(h.reshape(-1, 16).double() @ w.double().T + b.double(), dim=-1)
    assert rel_err(out.entropy, -(logp.exp() * logp).sum(-1)) <= 1e-5


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_a_confident_entropy_keeps_its_relative_precision(impl, triton_device):
    """Entropies near 0 (a confident policy) to fp32 relative precision: the forward sums
    non-negative terms, nothing cancels."""
    device = device_for(impl, triton_device)
    h, w, b, labels = make_batch(2, 8, 16, 40, device=device, seed=15, bias=False, scale=1.0)
    with torch.no_grad():
        h.mul_(6.0)
    out = linear_cross_entropy(h, w, labels, reduction="none", shift=True, return_entropy=True, impl=impl)
    _, entropy, _ = reference_logprobs(h, w, labels)
    valid = entropy != 0
    assert entropy[valid].min() < 1e-4  # the case this is about
    relative = ((out.entropy.double() - entropy).abs() / entropy.abs())[valid]
    assert relative.max() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype, triton_device):
    h, w, b, labels = make_batch(3, 10, 24, 70, dtype=dtype, device=triton_device, seed=16)
    out = linear_cross_entropy(
        h, w, labels, reduction="none", bias=b, shift=True, return_entropy=True, temperature=0.8, impl="triton"
    )
    logp, entropy, _ = reference_logprobs(h, w, labels, b, 0.8)
    tol_loss, tol_grad = TOLERANCES[dtype]
    assert rel_err(-out.loss, logp) <= tol_loss and rel_err(out.entropy, entropy) <= tol_loss
    for g, r in zip(grads_of((out.entropy - out.loss).sum(), (h, w, b)), grads_of((entropy + logp).sum(), (h, w, b))):
        assert rel_err(g, r) <= tol_grad


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), "1"])
def test_temperature_is_checked(temperature):
    h, w, b, labels = make_batch(2, 6, 8, 12)
    with pytest.raises(ValueError, match="temperature"):
        linear_cross_entropy(h, w, labels, reduction="none", temperature=temperature)


def test_unused_entropy_keeps_the_plain_kernels(triton_device, monkeypatch):
    """Log-probs alone launch the forward without the entropy's sums and the plain backward."""
    seen = spy_on_launches(monkeypatch, ("ENTROPY", "RICH_COEF"))
    h, w, b, labels = make_batch(2, 6, 8, 12, device=triton_device)
    (-linear_cross_entropy(h, w, labels, reduction="none", shift=True, impl="triton")).sum().backward()
    assert seen == [dict(ENTROPY=False), dict(RICH_COEF=False, ENTROPY=False)]
    seen.clear()
    out = linear_cross_entropy(h, w, labels, reduction="none", shift=True, return_entropy=True, impl="triton")
    out.loss.sum().backward()  # the entropy is computed but not in the loss: no entropy gradient
    assert seen == [dict(ENTROPY=True), dict(RICH_COEF=False, ENTROPY=False)]


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_the_registered_op_with_entropy_passes_opcheck(impl, triton_device):
    device = device_for(impl, triton_device)
    h, w, b, labels = make_batch(1, 6, 16, 40, device=device, seed=17, ragged=False, dead=False)
    args = (
        h.reshape(-1, 16).detach().requires_grad_(),
        w,
        b,
        labels.reshape(-1),
        None,
        -100,
        None,
        0.0,
        0.0,
        False,
        True,
        impl,
        False,
        "fused",
        None,
        0,
        "",
    )
    torch.library.opcheck(
        registration.token_terms, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor")
    )
