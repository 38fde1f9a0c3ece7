"""hardfocus_loss with the cross-entropy options, weights from the data (sample and token
weights) and plug-in rules, against fp64 references written independently."""

import math

import pytest
import torch
import torch.nn.functional as F

from hardfocus_fused import hardfocus_loss, linear_cross_entropy
from hardfocus_fused.weighting.rules import ExcessLoss, Rule

from helpers import device_for, grads_of, make_batch
from reference import reference_weights, rel_err

IMPLS = ["torch", "triton"]


def reference(
    hidden,
    weight,
    labels,
    *,
    bias=None,
    method="irdro",
    r=10.0,
    n1=0.25,
    n2=0.25,
    label_smoothing=0.0,
    class_weight=None,
    lse_square_scale=0.0,
    token_weight=None,
    sample_weight=None,
):
    """fp64, from the logits: per-token F.cross_entropy and z-loss, each sequence's loss the
    weighted mean of its cross-entropy over its class-weight mass plus the mean of its z-loss
    over its token count (Liger's: class weights weigh the cross-entropy only), the method's
    weights times the sample weights, renormalised.  For ``"mean"`` the cross-entropy parts
    are weighted by mass and the z-loss parts by count: the batch's token mean of each."""
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    z = hidden.double() @ weight.double().T + (bias.double() if bias is not None else 0)
    cw = class_weight.double() if class_weight is not None else None
    ce = F.cross_entropy(
        z.transpose(1, 2), targets, weight=cw, reduction="none", ignore_index=-100, label_smoothing=label_smoothing
    )
    valid = targets != -100
    z_loss = lse_square_scale * torch.where(valid, torch.logsumexp(z, -1), 0.0) ** 2
    count = valid.double()
    mass = count * (cw[targets.clamp_min(0)] if cw is not None else 1.0)
    if token_weight is not None:
        tw = torch.cat([token_weight[:, 1:], torch.zeros_like(token_weight[:, :1])], dim=1).double()
        ce, z_loss, mass, count = ce * tw, z_loss * tw, mass * tw, count * tw
        valid = valid & (tw > 0)
    per_seq = lambda values, by: values.sum(1) / torch.where(by.sum(1) > 0, by.sum(1), 1.0)  # noqa: E731
    seq_ce, seq_z = per_seq(ce, mass), per_seq(z_loss, count)

    def weights(seq_loss, counts):
        w = torch.tensor(
            reference_weights(seq_loss.tolist(), counts.tolist(), method, r, n1, n2, "mean"), dtype=torch.float64
        )
        if sample_weight is not None:
            w = w * sample_weight.double().cpu()
            w = w / w.sum()
        return w.to(seq_ce.device)

    if method == "mean":
        w, w_z = weights(seq_ce + seq_z, mass.sum(1)), weights(seq_ce + seq_z, count.sum(1))
        return (w * seq_ce).sum() + (w_z * seq_z).sum(), w
    w = weights(seq_ce + seq_z, valid.sum(1))
    return (w * (seq_ce + seq_z)).sum(), w


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("method", ["irdro", "midranking", "mean"])
def test_options_data_weights_and_methods(impl, method, triton_device):
    device = device_for(impl, triton_device)
    h, w, b, labels = make_batch(5, 9, 24, 60, device=device, seed=41)
    gen = torch.Generator().manual_seed(7)
    options = dict(
        label_smoothing=0.1,
        class_weight=(torch.rand(60, generator=gen) + 0.3).to(device),
        lse_square_scale=1e-3,
        token_weight=torch.rand(5, 9, generator=gen).to(device),
        sample_weight=torch.tensor([1.0, 0.5, 2.0, 1.0, 0.0]).to(device),
    )
    options["token_weight"][0, 5] = 0.0  # a dropped token
    loss, stats = hardfocus_loss(
        h, w, labels, bias=b, method=method, r=0.5, n2=0.5, impl=impl, return_stats=True, **options
    )
    want, want_w = reference(h, w, labels, bias=b, method=method, r=0.5, n2=0.5, **options)
    assert rel_err(loss, want) <= 1e-5
    assert rel_err(stats.weights, want_w) <= 1e-5
    assert stats.weights[4] == 0 and abs(stats.weights.sum().item() - 1) < 1e-6
    for g, r in zip(grads_of(loss, (h, w, b)), grads_of(want, (h, w, b))):
        assert rel_err(g, r) <= 1e-4


def test_mean_with_class_weights_is_pytorchs_weighted_mean():
    h, w, b, labels = make_batch(3, 8, 16, 40, seed=42)
    cw = torch.rand(40, generator=torch.Generator().manual_seed(1)) + 0.1
    ours = hardfocus_loss(h, w, labels, bias=b, method="mean", class_weight=cw, label_smoothing=0.2, impl="torch")
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    logits = (h.double() @ w.double().T + b.double()).transpose(1, 2)
    want = F.cross_entropy(logits, targets, weight=cw.double(), ignore_index=-100, label_smoothing=0.2)
    assert rel_err(ours, want) <= 1e-6


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "eps,with_cw,s", [(eps, cw, s) for eps in (0.0, 0.2) for cw in (False, True) for s in (0.0, 3e-2)]
)
def test_mean_method_is_the_fused_ops_mean(impl, eps, with_cw, s, triton_device):
    """``method="mean"`` equals ``linear_cross_entropy(reduction="mean")`` (and its
    gradients) for every combination of the options, class weights with z-loss included."""
    device = device_for(impl, triton_device)
    h, w, b, labels = make_batch(4, 9, 16, 40, device=device, seed=46)
    cw = (torch.rand(40, generator=torch.Generator().manual_seed(8)) * 3 + 0.1).to(device) if with_cw else None
    options = dict(label_smoothing=eps, class_weight=cw, lse_square_scale=s, impl=impl)
    ours = hardfocus_loss(h, w, labels, bias=b, method="mean", **options)
    theirs = linear_cross_entropy(h, w, labels, bias=b, shift=True, reduction="mean", **options)
    want, _ = reference(h, w, labels, bias=b, method="mean", label_smoothing=eps, class_weight=cw, lse_square_scale=s)
    assert rel_err(ours, want) <= 1e-5 and rel_err(theirs, want) <= 1e-5
    for g, r in zip(grads_of(ours, (h, w, b)), grads_of(want, (h, w, b))):
        assert rel_err(g, r) <= 1e-4


def test_sample_weights_are_irdros_reference_distribution():
    """IR-DRO with sample weights q: w ∝ q exp(L / r)."""
    h, w, b, labels = make_batch(4, 8, 16, 40, seed=43, dead=False)
    q = torch.tensor([0.1, 0.2, 0.3, 0.4])
    _, stats = hardfocus_loss(h, w, labels, bias=b, r=2.0, sample_weight=q, impl="torch", return_stats=True)
    expected = q * torch.exp(stats.seq_loss / 2.0)
    torch.testing.assert_close(stats.weights, expected / expected.sum())


def test_token_weights_equal_to_one_change_nothing():
    h, w, b, labels = make_batch(3, 8, 16, 40, seed=44)
    plain = hardfocus_loss(h, w, labels, bias=b, impl="torch")
    ones = hardfocus_loss(
        h, w, labels, bias=b, impl="torch", token_weight=torch.ones(3, 8), sample_weight=torch.ones(3)
    )
    torch.testing.assert_close(plain, ones)


def test_sample_weights_follow_packed_documents():
    """With position_ids each document gets its row's sample weight."""
    h, w, b, labels = make_batch(2, 12, 16, 40, seed=45, ragged=False, dead=False)
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6], list(range(12))])
    _, stats = hardfocus_loss(
        h,
        w,
        labels,
        bias=b,
        method="uniform",
        position_ids=position_ids,
        sample_weight=torch.tensor([1.0, 3.0]),
        impl="torch",
        return_stats=True,
    )
    torch.testing.assert_close(stats.weights, torch.tensor([1.0, 1.0, 3.0]) / 5.0)


def test_excess_loss_rule_is_rho1(triton_device):
    """Rho-1 by hand: keep the 60% of scored tokens whose loss exceeds the reference's most,
    token mean over them."""
    h, w, b, labels = make_batch(3, 10, 16, 40, seed=46)
    ref_w = w.detach() + 0.05 * torch.randn(w.shape, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        reference_loss = linear_cross_entropy(h, ref_w, labels, reduction="none", bias=b, shift=True, impl="torch")
    rule = ExcessLoss(keep=0.6)
    rule.reference = reference_loss
    ours = hardfocus_loss(h, w, labels, bias=b, method=rule, impl="torch")
    nll = linear_cross_entropy(
        h.double(), w.double(), labels, reduction="none", bias=b.double(), shift=True, impl="torch"
    )
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    scored = targets != -100
    excess = (nll - reference_loss.double())[scored]
    n_keep = math.ceil(0.6 * int(scored.sum()))
    kept = torch.zeros_like(excess)
    kept[excess.argsort(descending=True, stable=True)[:n_keep]] = 1.0
    want = (nll[scored] * kept).sum() / n_keep
    assert rel_err(ours, want) <= 1e-6
    for g, r in zip(grads_of(ours, (h, w)), grads_of(want, (h, w))):
        assert rel_err(g, r) <= 1e-5
    rule.reference = None
    with pytest.raises(ValueError, match="rule.reference"):
        hardfocus_loss(h, w, labels, bias=b, method=rule, impl="torch")


def test_a_sequence_rule_written_with_the_public_api():
    """A plug-in: weights ∝ loss^2 over the sequences (a custom hardness rule)."""

    class Squared(Rule):
        def __call__(self, seq_loss, n_tokens):
            w = torch.where(n_tokens > 0, seq_loss.detach() ** 2, 0.0)
            return w / w.sum()

    h, w, b, labels = make_batch(4, 8, 16, 40, seed=47)
    loss, stats = hardfocus_loss(h, w, labels, bias=b, method=Squared(), impl="torch", return_stats=True)
    expected = torch.where(stats.n_tokens > 0, stats.seq_loss**2, 0.0)
    torch.testing.assert_close(stats.weights, expected / expected.sum())


@pytest.mark.parametrize(
    "kwargs,error,word",
    [
        (dict(token_weight=torch.ones(2, 5)), ValueError, r"token_weight must have shape \(2, 6\)"),
        (dict(token_weight=-torch.ones(2, 6)), ValueError, "token_weight must be finite and >= 0"),
        (dict(sample_weight=torch.ones(2, dtype=torch.long)), TypeError, "sample_weight must be a floating"),
        (dict(sample_weight=torch.tensor([1.0, float("nan")])), ValueError, "sample_weight must be finite"),
        (
            dict(sample_weight=torch.ones(2), method=Rule()),
            ValueError,
            "sample_weight is not supported with a weighting rule",
        ),
    ],
)
def test_weight_checks(kwargs, error, word):
    h, w, b, labels = make_batch(2, 6, 8, 12)
    with pytest.raises(error, match=word):
        hardfocus_loss(h, w, labels, **kwargs)
