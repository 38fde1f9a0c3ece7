"""The option objects: built from keywords, validated once, and every combination they
accept runs: walking the grid, each combination is either refused when its object is
built, or runs a forward and a backward without raising."""

import dataclasses
import itertools

import pytest
import torch

from hardfocus_fused import HardFocusLoss, apply_hardfocus, hardfocus_loss, linear_cross_entropy
from hardfocus_fused.options import (
    CrossEntropy,
    Execution,
    HardFocusOptions,
    LCEOptions,
    Returns,
    Weighting,
)
from hardfocus_fused.weighting.rules import Rule

from helpers import make_batch
from hf_models import tiny_model

CLASS_WEIGHT = torch.linspace(0.5, 2.0, 12)
# (class_weight, lse_square_scale): the z-loss kept apart is the combination that matters.
TERMS = [(None, 0.0), (CLASS_WEIGHT, 0.0), (None, 1e-2), (CLASS_WEIGHT, 1e-2)]
RETURNS = [
    {},
    {"return_lse": True},
    {"return_z_loss": True},
    {"return_entropy": True},
    {"return_token_accuracy": True, "return_predicted_tokens": True},
]


def _runs(loss_of) -> None:
    """``loss_of()`` gives a loss (or an output whose .loss is one) whose backward runs and
    whose loss and gradients are finite."""
    h, w, loss = loss_of()
    loss = getattr(loss, "loss", loss)
    total = loss.sum() if loss.dim() else loss
    grads = torch.autograd.grad(total, (h, w))
    assert torch.isfinite(total) and all(torch.isfinite(g).all() for g in grads)


def _built_or_refused(build):
    """The built object, or None when it was refused with a ValueError/TypeError."""
    try:
        return build()
    except (ValueError, TypeError):
        return None


def _lce_grid(impls, backward_impls, returns):
    return list(itertools.product(impls, ("none", "sum", "mean"), backward_impls, returns, TERMS))


@pytest.mark.parametrize(
    "impl, reduction, backward_impl, extra, terms",
    _lce_grid(["torch"], ["auto", "fused", "matmul", "forward"], RETURNS),
)
def test_every_accepted_linear_cross_entropy_combination_runs(impl, reduction, backward_impl, extra, terms):
    class_weight, z = terms
    keywords = dict(
        reduction=reduction,
        backward_impl=backward_impl,
        class_weight=class_weight,
        lse_square_scale=z,
        impl=impl,
        **extra,
    )
    options = _built_or_refused(lambda: LCEOptions.build(**keywords))
    h, w, _, labels = make_batch(2, 6, 8, 12, bias=False)
    if options is None:  # refused when built: refused the same way by the function, before any work
        with pytest.raises((ValueError, TypeError)):
            linear_cross_entropy(h, w, labels, **keywords)
        return
    _runs(lambda: (h, w, linear_cross_entropy(h, w, labels, shift=True, options=options)))


def _same_as_torch(loss_of, options, triton_device) -> None:
    """The Triton path runs ``options`` (device-placed) and gives the torch path's loss and
    gradients (fp32 rounding apart)."""
    if options.cross_entropy.class_weight is not None:
        options = options.replace(class_weight=options.cross_entropy.class_weight.to(triton_device))
    h, w, _, labels = make_batch(4, 6, 8, 12, bias=False, device=triton_device)
    got = loss_of(h, w, labels, options)
    want = loss_of(h, w, labels, options.replace(impl="torch"))
    got_grads = torch.autograd.grad(got, (h, w))
    want_grads = torch.autograd.grad(want, (h, w))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for g, e in zip(got_grads, want_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "impl, reduction, backward_impl, extra, terms", _lce_grid(["triton"], ["auto", "forward"], [{}])
)
def test_every_accepted_combination_is_right_on_the_triton_path(
    impl, reduction, backward_impl, extra, terms, triton_device
):
    class_weight, z = terms
    options = _built_or_refused(
        lambda: LCEOptions.build(
            reduction=reduction,
            backward_impl=backward_impl,
            class_weight=class_weight,
            lse_square_scale=z,
            impl=impl,
            shift=True,
        )
    )
    if options is not None:
        _same_as_torch(lambda h, w, y, o: linear_cross_entropy(h, w, y, options=o).sum(), options, triton_device)


@pytest.mark.parametrize(
    "method, backward_impl, terms", list(itertools.product(["irdro", "uniform", "mean"], ["auto", "forward"], TERMS))
)
def test_every_accepted_weighting_is_right_on_the_triton_path(method, backward_impl, terms, triton_device):
    """Where the weights are known up front and ``backward_impl="forward"``, the
    three-product path runs: it must be refused wherever it would be wrong."""
    class_weight, z = terms
    options = _built_or_refused(
        lambda: HardFocusOptions.build(
            method=method, backward_impl=backward_impl, class_weight=class_weight, lse_square_scale=z, impl="triton"
        )
    )
    if options is not None:
        _same_as_torch(lambda h, w, y, o: hardfocus_loss(h, w, y, options=o), options, triton_device)


METHODS = ["irdro", "midranking", "uniform", "mean", Rule("mean")]


@pytest.mark.parametrize(
    "method, backward_impl, terms", list(itertools.product(METHODS, ["auto", "fused", "matmul", "forward"], TERMS))
)
def test_every_accepted_hardfocus_loss_combination_runs(method, backward_impl, terms):
    class_weight, z = terms
    keywords = dict(
        method=method, backward_impl=backward_impl, class_weight=class_weight, lse_square_scale=z, impl="torch"
    )
    options = _built_or_refused(lambda: HardFocusOptions.build(**keywords))
    h, w, _, labels = make_batch(4, 6, 8, 12, bias=False)
    if options is None:
        with pytest.raises((ValueError, TypeError)):
            HardFocusLoss(**keywords)
        return
    _runs(lambda: (h, w, hardfocus_loss(h, w, labels, options=options)))
    _runs(lambda: (h, w, HardFocusLoss(options)(h, w, labels)))


@pytest.mark.parametrize(
    "method, backward_impl, terms", list(itertools.product(["irdro", "mean"], ["auto", "forward"], TERMS))
)
def test_every_combination_apply_hardfocus_accepts_trains(method, backward_impl, terms):
    """What ``apply_hardfocus`` accepts trains: the combination of the report
    (``method="mean"``, ``backward_impl="forward"``, class weights and z-loss) is refused
    when patching, not at the first forward."""
    class_weight, z = terms
    model = tiny_model("llama")
    keywords = dict(
        method=method, backward_impl=backward_impl, class_weight=class_weight, lse_square_scale=z, impl="torch"
    )
    vocab = model.config.vocab_size
    if class_weight is not None:
        keywords["class_weight"] = torch.linspace(0.5, 2.0, vocab)
    try:
        apply_hardfocus(model, **keywords)
    except (ValueError, TypeError) as error:
        assert _built_or_refused(lambda: HardFocusOptions.build(**keywords)) is None, error
        return
    ids = torch.randint(0, vocab, (2, 8))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)


def test_the_reported_combination_is_refused_when_patching():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="backward_impl='forward'.*class_weight and lse_square_scale"):
        apply_hardfocus(
            model,
            method="mean",
            backward_impl="forward",
            class_weight=torch.ones(model.config.vocab_size),
            lse_square_scale=1e-3,
            verify=True,
        )


def test_keywords_go_to_the_part_that_owns_them():
    options = HardFocusOptions.build(method="midranking", n1=0.5, label_smoothing=0.1, impl="torch", shift=False)
    assert options.weighting == Weighting(method="midranking", n1=0.5)
    assert options.cross_entropy == CrossEntropy(label_smoothing=0.1)
    assert options.execution == Execution(impl="torch") and options.shift == 0
    lce = LCEOptions.build(return_lse=True, reduction="none", temperature=0.5)
    assert lce.returns == Returns(lse=True) and lce.cross_entropy.temperature == 0.5
    assert LCEOptions.build(lce) is lce and LCEOptions.build(lce, reduction="sum").reduction == "sum"
    assert HardFocusOptions.build(**options.as_keywords()) == options


def test_unknown_and_misplaced_options_are_named():
    with pytest.raises(TypeError, match="unknown option 'metod'.*method"):
        HardFocusOptions.build(metod="irdro")
    h, w, _, labels = make_batch(1, 4, 8, 12, bias=False)
    with pytest.raises(TypeError, match="unknown option 'return_stats'.*reduction"):
        linear_cross_entropy(h, w, labels, return_stats=True)  # hardfocus_loss's, not this one's
    with pytest.raises(TypeError, match="options must be a HardFocusOptions, got LCEOptions"):
        HardFocusOptions.build(LCEOptions())
    with pytest.raises(TypeError, match="weighting must be a Weighting"):
        HardFocusOptions(weighting=Execution())


@pytest.mark.parametrize(
    "build, word",
    [
        (lambda: Weighting(r=0), "r must be > 0"),
        (lambda: Weighting(n2=2.0), "n2 must be in"),
        (lambda: Weighting(method="top"), "method must be one of"),
        (lambda: CrossEntropy(temperature=0.0), "temperature must be > 0"),
        (lambda: CrossEntropy(softcap=-1.0), "softcap must be None or"),
        (lambda: CrossEntropy(ignore_index=1.5), "ignore_index must be an int"),
        (lambda: CrossEntropy(class_weight=torch.ones(3, requires_grad=True)), "class_weight must not require grad"),
        (lambda: Execution(impl="cuda"), "impl must be one of"),
        (lambda: Execution(deterministic="yes"), "deterministic must be"),
        (lambda: Returns(entropy=1), "return_entropy must be True or False"),
        (lambda: LCEOptions(reduction="avg"), "reduction must be one of"),
        (lambda: LCEOptions(shift=-1), "shift must be >= 0"),
        (lambda: HardFocusOptions(return_stats=None), "return_stats must be True or False"),
    ],
)
def test_each_mistake_has_its_message(build, word):
    with pytest.raises((ValueError, TypeError), match=word):
        build()


def test_options_are_frozen_and_normalised():
    options = CrossEntropy(class_weight=torch.ones(4, dtype=torch.float64), softcap=30, label_smoothing=0)
    assert options.class_weight.dtype == torch.float32 and options.softcap == 30.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.softcap = 1.0


def test_linear_cross_entropy_defaults_to_the_mean_like_the_peers():
    h, w, _, labels = make_batch(2, 6, 8, 12, bias=False)
    labels[0, :2] = -100
    logits = h.reshape(-1, 8) @ w.T
    want = torch.nn.functional.cross_entropy(logits, labels.reshape(-1))
    torch.testing.assert_close(linear_cross_entropy(h, w, labels, impl="torch"), want)
    linear_cross_entropy(h, w, labels, impl="torch").backward()  # a scalar, as a drop-in loss must be


@pytest.mark.parametrize(
    "keyword, value",
    [("softcap", 30.0), ("temperature", 0.7), ("shift", False), ("ignore_index", 0), ("return_stats", True)],
)
def test_apply_hardfocus_refuses_what_the_model_defines(keyword, value):
    with pytest.raises(ValueError, match=f"apply_hardfocus does not take {keyword}: "):
        apply_hardfocus(tiny_model("llama"), **{keyword: value})
