"""The cross-entropy options of the fused op (label smoothing, class weights, z-loss, the
log-sum-exp, token accuracy, predicted tokens) against an fp64 reference that
materialises the logits, on every implementation and backward strategy."""

import pytest
import torch
import torch.nn.functional as F

from hardfocus_fused import linear_cross_entropy
from hardfocus_fused.cross_entropy import LCEOutput

from helpers import TOLERANCES, device_for, grads_of, make_batch, spy_on_launches
from reference import rel_err

# (impl, backward_impl, deterministic)
PATHS = [("torch", "auto", None), ("triton", "fused", False), ("triton", "fused", True), ("triton", "matmul", False)]


def reference(
    hidden,
    weight,
    targets,
    bias=None,
    softcap=None,
    reduction="mean",
    label_smoothing=0.0,
    class_weight=None,
    lse_square_scale=0.0,
):
    """fp64, the written definition (docs/api.md): F.cross_entropy on the logits plus Liger's
    z-loss ``s * lse^2`` per scored token; a mean divides the cross-entropy by the scored
    targets' class weights (PyTorch's) and the z-loss by their count (Liger's)."""
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    flat, t = z.reshape(-1, z.shape[-1]), targets.reshape(-1)
    cw = class_weight.double() if class_weight is not None else None
    ce = F.cross_entropy(flat, t, weight=cw, ignore_index=-100, reduction="none", label_smoothing=label_smoothing)
    valid = t != -100
    lse = torch.where(valid, torch.logsumexp(flat, dim=-1), 0.0)
    z_loss = lse_square_scale * lse**2
    if reduction == "none":
        return (ce + z_loss).view(targets.shape), lse, flat
    if reduction == "sum":
        return (ce + z_loss).sum(), lse, flat
    mass = cw[t.clamp_min(0)][valid].sum() if cw is not None else valid.sum()
    return ce.sum() / mass + z_loss.sum() / valid.sum(), lse, flat


def _batch(dtype, device, seed=31):
    h, w, b, labels = make_batch(3, 10, 24, 70, dtype=dtype, device=device, seed=seed)
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    return h, w, b, targets


@pytest.mark.parametrize("impl,backward_impl,deterministic", PATHS)
@pytest.mark.parametrize(
    "options",
    [
        dict(label_smoothing=0.1),
        dict(class_weight=True),
        dict(label_smoothing=0.2, class_weight=True, lse_square_scale=1e-3),
        dict(lse_square_scale=1e-2, softcap=5.0),
    ],
)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_options_match_pytorch(impl, backward_impl, deterministic, options, reduction, triton_device):
    h, w, b, targets = _batch(torch.float32, device_for(impl, triton_device))
    options = dict(options)
    if options.pop("class_weight", False):
        options["class_weight"] = torch.rand(70, generator=torch.Generator().manual_seed(2)).to(h.device) + 0.2
    got = linear_cross_entropy(
        h,
        w,
        targets,
        bias=b,
        reduction=reduction,
        impl=impl,
        backward_impl=backward_impl,
        deterministic=deterministic,
        **options,
    )
    want, _, _ = reference(h, w, targets, bias=b, reduction=reduction, **options)
    assert rel_err(got, want) <= 1e-5
    upstream = (
        torch.rand(want.shape, generator=torch.Generator().manual_seed(3)).to(h.device)
        if reduction == "none"
        else torch.tensor(1.0)
    )
    for g, r in zip(
        grads_of((got * upstream.to(got.device)).sum(), (h, w, b)),
        grads_of((want * upstream.to(want.device).double()).sum(), (h, w, b)),
    ):
        assert rel_err(g, r) <= 1e-4


# Every combination of the options that change the per-token loss, on and off.
COMBINATIONS = [
    dict(label_smoothing=eps, class_weight=cw, lse_square_scale=s)
    for eps in (0.0, 0.15)
    for cw in (False, True)
    for s in (0.0, 2e-2)
]


@pytest.mark.parametrize("impl,backward_impl,deterministic", [PATHS[0], PATHS[1]])
@pytest.mark.parametrize("options", COMBINATIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_combination_follows_its_definition(
    impl, backward_impl, deterministic, options, reduction, triton_device
):
    """Label smoothing x class weights x z-loss x reductions, loss, returned z-loss and
    gradients under a signed upstream gradient, each against the written definition."""
    device = device_for(impl, triton_device)
    h, w, b, targets = _batch(torch.float32, device, seed=36)
    options = dict(options)
    if options["class_weight"]:
        # Far from 1 on average, so a z-loss divided by the class-weight mass would show.
        options["class_weight"] = (torch.rand(70, generator=torch.Generator().manual_seed(5)) * 3 + 0.1).to(device)
    else:
        options["class_weight"] = None
    out = linear_cross_entropy(
        h,
        w,
        targets,
        bias=b,
        reduction=reduction,
        impl=impl,
        backward_impl=backward_impl,
        deterministic=deterministic,
        return_z_loss=True,
        **options,
    )
    want, lse, _ = reference(h, w, targets, bias=b, reduction=reduction, **options)
    assert rel_err(out.loss, want) <= 1e-5
    z_want = (
        reference(h, w, targets, bias=b, reduction=reduction, lse_square_scale=options["lse_square_scale"])[0]
        - reference(h, w, targets, bias=b, reduction=reduction)[0]
    )
    assert rel_err(out.z_loss, z_want) <= 1e-4 if options["lse_square_scale"] else not out.z_loss.any()
    upstream = (
        torch.randn(want.shape, generator=torch.Generator().manual_seed(6))
        if reduction == "none"
        else torch.tensor(-0.7)
    )
    for g, r in zip(
        grads_of((out.loss * upstream.to(device)).sum(), (h, w, b)),
        grads_of((want * upstream.to(device).double()).sum(), (h, w, b)),
    ):
        assert rel_err(g, r) <= 1e-4


def test_z_loss_with_class_weights_is_a_token_mean():
    """The reported case: the z-loss part of a class-weighted mean is divided by the number
    of scored tokens, not by the class weights of their targets."""
    torch.manual_seed(0)
    h, w = torch.randn(64, 16, dtype=torch.float64), torch.randn(32, 16, dtype=torch.float64)
    t, c, s = torch.randint(0, 32, (64,)), torch.rand(32), 1e-2
    lse = torch.logsumexp(h @ w.T, -1)
    out = linear_cross_entropy(
        h, w, t, class_weight=c, lse_square_scale=s, reduction="mean", return_z_loss=True, impl="torch"
    )
    assert rel_err(out.z_loss, (s * lse**2).mean()) <= 1e-6  # the torch path computes in fp32
    ce = F.cross_entropy(h @ w.T, t, weight=c.double())
    assert rel_err(out.loss, ce + (s * lse**2).mean()) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_options_in_half_precision(dtype, triton_device):
    h, w, b, targets = _batch(dtype, triton_device, seed=32)
    weights = torch.rand(70, generator=torch.Generator().manual_seed(4)).to(triton_device) + 0.5
    options = dict(label_smoothing=0.1, class_weight=weights, lse_square_scale=1e-3)
    got = linear_cross_entropy(h, w, targets, bias=b, reduction="mean", impl="triton", **options)
    want, _, _ = reference(h, w, targets, bias=b, **options)
    tol_loss, tol_grad = TOLERANCES[dtype]
    assert rel_err(got, want) <= tol_loss
    for g, r in zip(grads_of(got, (h, w, b)), grads_of(want, (h, w, b))):
        assert rel_err(g, r) <= tol_grad


@pytest.mark.parametrize("impl,backward_impl,deterministic", PATHS)
def test_returned_lse_z_loss_accuracy_and_predictions(impl, backward_impl, deterministic, triton_device):
    h, w, b, targets = _batch(torch.float32, device_for(impl, triton_device), seed=33)
    with torch.no_grad():  # make some predictions right: pull a few hidden states onto their target rows
        rows = (targets != -100).nonzero()[::2]
        h[rows[:, 0], rows[:, 1]] += 3.0 * w[targets[rows[:, 0], rows[:, 1]]]
    out = linear_cross_entropy(
        h,
        w,
        targets,
        bias=b,
        reduction="mean",
        lse_square_scale=1e-2,
        return_lse=True,
        return_z_loss=True,
        return_token_accuracy=True,
        return_predicted_tokens=True,
        impl=impl,
        backward_impl=backward_impl,
        deterministic=deterministic,
    )
    assert isinstance(out, LCEOutput)
    want, lse, logits = reference(h, w, targets, bias=b, lse_square_scale=1e-2)
    valid = targets != -100
    assert rel_err(out.loss, want) <= 1e-5
    assert rel_err(out.lse, lse.view(targets.shape)) <= 1e-6
    assert rel_err(out.z_loss, (1e-2 * lse**2).sum() / valid.sum()) <= 1e-5
    predicted = torch.where(valid, logits.argmax(-1).view(targets.shape), -1)
    assert torch.equal(out.predicted_tokens, predicted)
    accuracy = ((predicted == targets) & valid).sum() / valid.sum()
    assert 0 < accuracy < 1 and out.token_accuracy.item() == pytest.approx(accuracy.item())
    # A loss built on the returned log-sum-exp backpropagates through the kernels.
    ours = grads_of((out.lse**2).sum() + out.loss, (h, w, b))
    ref = grads_of((lse**2).sum() + want, (h, w, b))
    for g, r in zip(ours, ref):
        assert rel_err(g, r) <= 1e-4


def test_accuracy_per_token_and_summed(triton_device):
    h, w, b, targets = _batch(torch.float32, "cpu", seed=34)
    per_token = linear_cross_entropy(h, w, targets, reduction="none", bias=b, return_token_accuracy=True, impl="torch")
    summed = linear_cross_entropy(h, w, targets, bias=b, reduction="sum", return_token_accuracy=True, impl="torch")
    assert per_token.token_accuracy.shape == targets.shape
    assert summed.token_accuracy.item() == per_token.token_accuracy.sum().item()
    assert per_token.lse is None and per_token.z_loss is None and per_token.predicted_tokens is None


def test_argmax_takes_the_first_maximum(triton_device):
    """Ties: the first column with the largest logit, across tiles and splits."""
    from hardfocus_fused.kernels.config import KernelConfig
    from hardfocus_fused.op.dispatch import token_terms

    h = torch.ones(4, 8, device=triton_device)
    w = torch.zeros(100, 8, device=triton_device)
    w[[17, 40, 99]] = 1.0  # equal largest logits in three tiles of 16 (two splits)
    targets = torch.tensor([17, 40, 99, 3], device=triton_device)
    for impl in ("torch", "triton"):
        config = KernelConfig(block_n=16, block_v=16, block_h=16, vocab_splits=2)
        best = token_terms(h, w, targets, None, -100, None, impl, kernel_config=config, argmax=True).argmax
        assert best.tolist() == [17, 17, 17, 17]


@pytest.mark.parametrize(
    "kwargs,error,word",
    [
        (dict(label_smoothing=1.5), ValueError, "label_smoothing must be in"),
        (dict(label_smoothing="0.1"), ValueError, "label_smoothing"),
        (dict(lse_square_scale=-1.0), ValueError, "lse_square_scale"),
        (dict(class_weight=torch.ones(5)), ValueError, "class_weight has 5 entries but the head has 12"),
        (dict(class_weight=torch.ones(12, dtype=torch.long)), TypeError, "class_weight must be float"),
        (dict(return_lse=1), TypeError, "return_lse"),
    ],
)
def test_option_checks(kwargs, error, word):
    h, w, b, labels = make_batch(2, 6, 8, 12)
    with pytest.raises(error, match=word):
        linear_cross_entropy(h, w, labels, **kwargs)


def test_unused_options_keep_the_plain_kernels(triton_device, monkeypatch):
    """Options at their defaults: the kernels are launched with every term off (the
    compiled plain variants), and the coefficients stay one per token."""
    seen = spy_on_launches(monkeypatch, ("SMOOTH", "ARGMAX", "CLASS_WEIGHT", "RICH_COEF"))
    h, w, b, targets = _batch(torch.float32, triton_device, seed=35)
    linear_cross_entropy(h, w, targets, bias=b, reduction="mean", impl="triton").backward()
    assert seen == [dict(SMOOTH=False, ARGMAX=False, CLASS_WEIGHT=False), dict(RICH_COEF=False, CLASS_WEIGHT=False)]
