"""The three-product path (``backward_impl="forward"``, ``op.forward_gradients``): gradients
formed in the forward for losses whose per-token weights are known up front, against an
fp64 reference that materialises the logits."""

import pytest
import torch
import torch.nn.functional as F

from hardfocus_fused import hardfocus_loss, linear_cross_entropy
from hardfocus_fused.kernels import cost_model
from hardfocus_fused.kernels.config import HeadConfigs, KernelConfig
from hardfocus_fused.op import registration
from hardfocus_fused.op.dispatch import weighted_sum

from helpers import make_batch


def _inputs(dtype, device, n=70, h=48, v=333, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64) * 0.6
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64) * 0.6
    bias = torch.randn(v, generator=gen, dtype=torch.float64) * 0.1
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[::7] = -100
    cast = lambda t: t.to(dtype).to(device).requires_grad_()  # noqa: E731
    return cast(hidden), cast(weight), cast(bias), targets.to(device)


def _reference(
    hidden, weight, bias, targets, reduction, softcap=None, label_smoothing=0.0, class_weight=None, lse_square_scale=0.0
):
    """fp64 loss from materialised logits: PyTorch's cross-entropy plus Liger's z-loss."""
    h, w, b = (t.detach().double().cpu().requires_grad_() for t in (hidden, weight, bias))
    z = h @ w.T + b
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    cw = class_weight.double().cpu() if class_weight is not None else None
    t = targets.cpu()
    loss = F.cross_entropy(z, t, weight=cw, ignore_index=-100, reduction=reduction, label_smoothing=label_smoothing)
    if lse_square_scale:
        valid = t != -100
        zl = torch.where(valid, lse_square_scale * torch.logsumexp(z, 1) ** 2, 0.0).sum()
        loss = loss + (zl / valid.sum().clamp_min(1) if reduction == "mean" else zl)
    return loss, (h, w, b)


def _rel(got, want):
    return ((got.detach().double().cpu() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


OPTIONS = [
    {},
    {"softcap": 3.0},
    {"label_smoothing": 0.1},
    {"class_weight": "rand"},
    {"label_smoothing": 0.2, "class_weight": "rand", "softcap": 5.0},
    {"lse_square_scale": 1e-3},
]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(o) or "plain")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_three_products_against_fp64(reduction, options, dtype, triton_device):
    hidden, weight, bias, targets = _inputs(dtype, triton_device)
    options = dict(options)
    if options.get("class_weight") == "rand":
        options["class_weight"] = torch.rand(weight.shape[0], generator=torch.Generator().manual_seed(1)) + 0.5
    kwargs = {k: (v.to(triton_device) if isinstance(v, torch.Tensor) else v) for k, v in options.items()}
    loss = linear_cross_entropy(
        hidden, weight, targets, bias=bias, reduction=reduction, impl="triton", backward_impl="forward", **kwargs
    )
    (0.37 * loss).backward()  # any upstream gradient scales the stored ones
    want, (h, w, b) = _reference(hidden, weight, bias, targets, reduction, **options)
    (0.37 * want).backward()
    assert abs(loss.item() - want.item()) <= 1e-5 * abs(want.item())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for got, ref in ((hidden.grad, h.grad), (weight.grad, w.grad), (bias.grad, b.grad)):
        assert got.dtype == dtype
        assert _rel(got, ref) <= tol


def test_three_products_equal_four(triton_device):
    """fp32: the same gradients as the four-product backward, across several token chunks
    (a chunk budget of 9 rows of logits)."""
    hidden, weight, bias, targets = _inputs(torch.float32, triton_device, n=50)
    tiny = HeadConfigs.of(KernelConfig(block_n=16, block_v=64, block_h=16, num_warps=4, num_stages=1))
    import dataclasses

    chunked = dataclasses.replace(tiny, matmul_chunk_bytes=16 * 4 * weight.shape[0])

    def run(backward_impl, config=None):
        for t in (hidden, weight, bias):
            t.grad = None
        if config is None:
            loss = linear_cross_entropy(
                hidden, weight, targets, bias=bias, reduction="mean", impl="triton", backward_impl=backward_impl
            )
        else:
            valid = targets != -100
            loss, _ = weighted_sum(
                hidden,
                weight,
                targets,
                valid.float() / valid.sum(),
                bias,
                -100,
                None,
                (True, True, True),
                kernel_config=config,
            )
        loss.backward()
        return loss.detach(), hidden.grad.clone(), weight.grad.clone(), bias.grad.clone()

    four = run("fused")
    for three in (run("forward"), run("forward", chunked)):
        for got, want in zip(three, four):
            torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("frozen", ["weight", "hidden"])
def test_only_the_needed_gradients_are_formed(frozen, triton_device, monkeypatch):
    hidden, weight, bias, targets = _inputs(torch.float32, triton_device)
    (hidden if frozen == "hidden" else weight).requires_grad_(False)
    seen = []
    real = registration.weighted_terms
    monkeypatch.setattr(registration, "weighted_terms", lambda *args: seen.append(args[-3:]) or real(*args))
    loss = linear_cross_entropy(
        hidden, weight, targets, bias=bias, reduction="sum", impl="triton", backward_impl="forward"
    )
    loss.backward()
    assert seen == [(frozen != "hidden", frozen != "weight", True)]
    want, (h, w, b) = _reference(hidden, weight, bias, targets, "sum")
    want.backward()
    live = weight if frozen == "hidden" else hidden
    assert _rel(live.grad, (w if frozen == "hidden" else h).grad) <= 1e-5
    assert (hidden if frozen == "hidden" else weight).grad is None


def test_without_gradients_the_plain_forward_runs(triton_device, monkeypatch):
    hidden, weight, bias, targets = _inputs(torch.float32, triton_device)
    monkeypatch.setattr(registration, "weighted_terms", None)  # would fail if called
    with torch.no_grad():
        loss = linear_cross_entropy(
            hidden, weight, targets, bias=bias, reduction="mean", impl="triton", backward_impl="forward"
        )
    want, _ = _reference(hidden, weight, bias, targets, "mean")
    assert abs(loss.item() - want.item()) <= 1e-5 * want.item()


def test_refused_where_the_weights_depend_on_the_losses(triton_device):
    hidden, weight, bias, targets = _inputs(torch.float32, triton_device, n=16)
    with pytest.raises(ValueError, match="backward_impl='forward'"):
        linear_cross_entropy(hidden, weight, targets, reduction="none", impl="triton", backward_impl="forward")
    with pytest.raises(ValueError, match="backward_impl='forward'"):
        linear_cross_entropy(
            hidden, weight, targets, reduction="mean", return_lse=True, impl="triton", backward_impl="forward"
        )
    h, w, b, labels = make_batch(2, 8, 16, 40, device=triton_device)
    with pytest.raises(ValueError, match="backward_impl='forward'"):
        hardfocus_loss(h, w, labels, method="irdro", impl="triton", backward_impl="forward")
    with pytest.raises(ValueError, match="backward_impl must be one of"):
        linear_cross_entropy(hidden, weight, targets, reduction="mean", backward_impl="early")


def test_the_per_token_loss_is_not_differentiable(triton_device):
    hidden, weight, bias, targets = _inputs(torch.float32, triton_device, n=16)
    valid = targets != -100
    _, token_loss = weighted_sum(hidden, weight, targets, valid.float(), bias, -100, None, (True, True, True))
    with pytest.raises(RuntimeError, match="not differentiable"):
        token_loss.sum().backward()


def test_auto_takes_three_products_where_the_model_says(triton_device, monkeypatch):
    """Off a GPU "auto" keeps four products; with a device whose model says yes, three."""
    if triton_device != "cpu":
        pytest.skip("forces a device capability on the interpreter")
    from hardfocus_fused.kernels import config

    hidden, weight, bias, targets = _inputs(torch.float32, triton_device)
    calls = []
    real = registration.weighted_terms
    monkeypatch.setattr(registration, "weighted_terms", lambda *args: calls.append(1) or real(*args))
    linear_cross_entropy(hidden, weight, targets, bias=bias, reduction="mean", impl="triton").backward()
    assert calls == []
    monkeypatch.setattr(config, "device_capability", lambda device: 90)
    monkeypatch.setattr(cost_model, "choose_forward_gradients", lambda *args: True)
    linear_cross_entropy(hidden, weight, targets, bias=bias, reduction="mean", impl="triton").backward()
    assert calls == [1]
    linear_cross_entropy(
        hidden, weight, targets, bias=bias, reduction="mean", impl="triton", deterministic=True
    ).backward()
    linear_cross_entropy(
        hidden, weight, targets, bias=bias, reduction="mean", impl="triton", backward_impl="matmul"
    ).backward()
    assert calls == [1]  # deterministic, or a backward asked for: four


def test_compiles_as_one_node(triton_device):
    import torch._dynamo as dynamo

    hidden, weight, bias, targets = _inputs(torch.float32, triton_device, n=24)

    def fn(h, w):
        return linear_cross_entropy(
            h,
            w,
            targets,
            reduction="mean",
            impl="triton",
            backward_impl="forward",
        )

    dynamo.reset()
    explained = dynamo.explain(fn)(hidden, weight)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(hidden, weight), (hidden, weight))
    want = torch.autograd.grad(fn(hidden, weight), (hidden, weight))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-8)


def test_the_op_passes_opcheck(triton_device):
    hidden, weight, bias, targets = _inputs(torch.float32, triton_device, n=12, v=40)
    valid = targets != -100
    args = (
        hidden.detach().requires_grad_(),
        weight.detach().requires_grad_(),
        bias.detach().requires_grad_(),
        targets,
        None,
        valid.float(),
        -100,
        None,
        0.0,
        0.0,
        None,
        0,
        "",
        True,
        True,
        True,
    )
    torch.library.opcheck(
        registration.weighted_terms, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor")
    )


def test_the_model_counts_three_products():
    shape = cost_model.HeadShape(16384, 4096, 128256)
    gpu = cost_model.GPUS["H100"]
    three = cost_model.forward_gradients(shape, gpu)
    assert three.total("flops") == pytest.approx(3 * shape.product_flops)
    four = cost_model.forward(shape, gpu) + cost_model.backward_matmul(shape, gpu)
    assert three.seconds(gpu) < 0.85 * four.seconds(gpu)  # the saving the issue asks the model to show
    assert cost_model.choose_forward_gradients(16384, 4096, 128256, 2, 90, 132, True, 80 * 2**30)
    assert not cost_model.choose_forward_gradients(16384, 4096, 128256, 2, 90, 132, True, 24 * 2**30)  # memory
    assert not cost_model.choose_forward_gradients(16384, 4096, 128256, 2, None)  # no device


HF_OPTIONS = [
    dict(method="mean"),
    dict(method="uniform"),
    dict(method="mean", seq_reduction="sum"),
    dict(method="uniform", seq_reduction="sum", label_smoothing=0.1),
    dict(method="mean", class_weight="rand", token_weight="rand", sample_weight="rand"),
    dict(method="uniform", token_weight="rand", sample_weight="rand", lse_square_scale=1e-3, softcap=4.0),
    dict(method="uniform", packed=True),
    dict(method="mean", packed=True, sample_weight="rand"),
]


@pytest.mark.parametrize("options", HF_OPTIONS, ids=lambda o: "-".join(f"{k}" for k in o))
def test_hardfocus_loss_with_known_weights(options, triton_device):
    """``hardfocus_loss(method="mean"/"uniform")`` by three products: the loss, the stats and
    every gradient equal the four-product path's (which the fp64 tests hold)."""
    options = dict(options)
    h, w, b, labels = make_batch(4, 12, 16, 70, device=triton_device, seed=3)
    gen = torch.Generator().manual_seed(5)
    if options.pop("packed", False):
        position_ids = torch.cat([torch.arange(5), torch.arange(7)]).repeat(4, 1).to(triton_device)
        options["position_ids"] = position_ids
    for name, shape in (("class_weight", (70,)), ("token_weight", (4, 12)), ("sample_weight", (4,))):
        if options.get(name) == "rand":
            options[name] = (torch.rand(shape, generator=gen) + 0.2).to(triton_device)
    if "token_weight" in options:
        options["token_weight"][1, 3] = 0.0  # a dropped token

    def run(backward_impl):
        loss, stats = hardfocus_loss(
            h, w, labels, bias=b, impl="triton", backward_impl=backward_impl, return_stats=True, **options
        )
        return (loss, stats, *torch.autograd.grad(loss, (h, w, b)))

    three, four = run("forward"), run("fused")
    torch.testing.assert_close(three[0], four[0], rtol=1e-5, atol=1e-7)
    for field in ("seq_loss", "weights", "n_tokens"):
        torch.testing.assert_close(getattr(three[1], field), getattr(four[1], field), rtol=1e-5, atol=1e-7)
    for got, want in zip(three[2:], four[2:]):
        torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-7)
