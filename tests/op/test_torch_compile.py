"""torch.compile and torch.save: the fused op is one opaque node (a ``torch.library`` custom
op with fake implementations and a registered backward), the weighting math around it
traces without graph breaks, and a patched model compiles, deep-copies, pickles and
reloads like any model, training exactly as the original."""

import copy
import io

import pytest
import torch
import torch._dynamo as dynamo

from hardfocus_fused import hardfocus_loss, linear_cross_entropy
from hardfocus_fused.op import registration

from helpers import device_for, grads_of, make_batch
from reference import rel_err

IMPLS = ["torch", "triton"]
METHODS = ["irdro", "midranking", "highranking", "lowranking", "uniform", "mean"]


def graph_breaks(fn, *args) -> tuple[int, list[str]]:
    dynamo.reset()
    explained = dynamo.explain(fn)(*args)
    return explained.graph_break_count, [str(b.reason).splitlines()[0] for b in explained.break_reasons]


def _options(device):
    gen = torch.Generator().manual_seed(3)
    return dict(
        label_smoothing=0.1,
        class_weight=(torch.rand(60, generator=gen) + 0.5).to(device),
        lse_square_scale=1e-3,
        token_weight=torch.rand(4, 9, generator=gen).to(device),
        sample_weight=torch.rand(4, generator=gen).to(device),
    )


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("extra", ["plain", "options", "stats"])
def test_hardfocus_loss_has_no_graph_break(method, extra):
    h, w, b, labels = make_batch(4, 9, 16, 60, seed=1)
    kwargs = dict(method=method, impl="torch")
    if extra == "options":
        kwargs.update(_options("cpu"))
    if extra == "stats":
        kwargs.update(return_stats=True)
    count, reasons = graph_breaks(
        lambda h, w, b, labels: hardfocus_loss(h, w, labels, bias=b, **kwargs), h, w, b, labels
    )
    assert count == 0, reasons


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_linear_cross_entropy_has_no_graph_break(reduction):
    h, w, b, labels = make_batch(4, 9, 16, 60, seed=2)
    count, reasons = graph_breaks(
        lambda h, w: linear_cross_entropy(
            h,
            w,
            labels,
            shift=True,
            reduction=reduction,
            impl="torch",
            label_smoothing=0.1,
            lse_square_scale=1e-3,
            return_lse=True,
            return_z_loss=True,
            return_token_accuracy=True,
        ),
        h,
        w,
    )
    assert count == 0, reasons


def test_packed_documents_stay_outside_a_graph():
    """``position_ids`` need the document count on the host (a data-dependent shape): the
    documented exception."""
    h, w, b, labels = make_batch(2, 8, 16, 60, seed=3, ragged=False, dead=False)
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3], list(range(8))])
    count, _ = graph_breaks(lambda h: hardfocus_loss(h, w, labels, position_ids=position_ids, impl="torch"), h)
    assert count > 0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("method", ["irdro", "midranking"])
def test_compiled_loss_equals_eager(impl, method, triton_device):
    device = device_for(impl, triton_device)
    h, w, b, labels = make_batch(4, 9, 16, 60, device=device, seed=4)
    options = dict(method=method, impl=impl, **_options(device))
    eager = hardfocus_loss(h, w, labels, bias=b, **options)
    compiled = torch.compile(
        lambda h, w, b: hardfocus_loss(h, w, labels, bias=b, **options), backend="aot_eager", fullgraph=True
    )(h, w, b)
    assert rel_err(compiled, eager) <= 1e-6
    for g, r in zip(grads_of(compiled, (h, w, b)), grads_of(eager, (h, w, b))):
        assert rel_err(g, r) <= 1e-6


def test_bad_labels_are_refused_inside_a_compiled_graph():
    h, w, b, labels = make_batch(2, 6, 8, 12, seed=5)
    labels[1, 3] = 12
    compiled = torch.compile(lambda h: hardfocus_loss(h, w, labels, impl="torch"), backend="aot_eager", fullgraph=True)
    with pytest.raises(ValueError, match="labels contains 12, outside"):
        compiled(h)
    weights = torch.ones(2, 6)
    weights[0, 2] = float("nan")
    labels[1, 3] = 1
    compiled = torch.compile(
        lambda h: hardfocus_loss(h, w, labels, impl="torch", token_weight=weights), backend="aot_eager", fullgraph=True
    )
    with pytest.raises(ValueError, match="token_weight must be finite"):
        compiled(h)


@pytest.mark.parametrize("impl", IMPLS)
def test_the_registered_op_passes_opcheck(impl, triton_device):
    """Schema, fake implementation and autograd registration agree with the real op."""
    device = device_for(impl, triton_device)
    h, w, b, labels = make_batch(1, 6, 16, 40, device=device, seed=6, ragged=False, dead=False)
    targets = labels.reshape(-1)
    args = (
        h.reshape(-1, 16).detach().requires_grad_(),
        w,
        b,
        targets,
        None,
        -100,
        None,
        0.0,
        0.0,
        False,
        False,
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


# -- a patched model -----------------------------------------------------------------------

transformers = pytest.importorskip("transformers")

from hardfocus_fused import apply_hardfocus, hardfocus_patch  # noqa: E402

from hf_models import left_padded_batch, tiny_model  # noqa: E402


def _step(model, batch):
    """Loss and gradients of one training forward + backward."""
    model.zero_grad(set_to_none=True)
    ids, mask, labels = batch
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    return out.loss.detach(), {
        name.removeprefix("_orig_mod."): p.grad.clone() for name, p in model.named_parameters() if p.grad is not None
    }


def _assert_same_step(a, b, tol=0.0):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert rel_err(loss_a, loss_b) <= tol
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert rel_err(grads_a[name], grads_b[name]) <= max(tol, 0.0), name


def test_patched_model_forward_has_no_graph_break():
    model = apply_hardfocus(tiny_model("llama"), method="midranking", impl="torch")
    ids, mask, labels = left_padded_batch()
    count, reasons = graph_breaks(lambda: model(input_ids=ids, attention_mask=mask, labels=labels).loss)
    assert count == 0, reasons


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_compiled_patched_model_trains_as_eager(arch):
    model = apply_hardfocus(tiny_model(arch), method="irdro", r=0.5, impl="torch")
    batch = left_padded_batch()
    eager = _step(model, batch)
    compiled = _step(torch.compile(model, backend="aot_eager"), batch)
    _assert_same_step(compiled, eager, tol=1e-5)
    assert hardfocus_patch(model).last_stats is not None


def test_reloaded_model_trains_exactly_as_the_original():
    """``torch.save(model)`` / ``torch.load``: the patch comes back whole (no recursion, the
    weighted loss, the model's signature) and one SGD step lands on the same weights."""
    import inspect

    model = apply_hardfocus(tiny_model("llama"), method="irdro", r=0.5, impl="torch")
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert hardfocus_patch(loaded).model is loaded and hardfocus_patch(loaded) is not hardfocus_patch(model)
    assert inspect.signature(loaded.forward) == inspect.signature(model.forward)
    assert "labels" in inspect.signature(loaded.forward).parameters
    batch = left_padded_batch()
    _assert_same_step(_step(loaded, batch), _step(model, batch))
    for m in (model, loaded):
        with torch.no_grad():
            for p in m.parameters():
                p -= 0.5 * p.grad
    for (name, p), q in zip(model.named_parameters(), loaded.parameters()):
        assert torch.equal(p, q), name
    out = loaded(input_ids=batch[0], attention_mask=batch[1], labels=batch[2])
    assert out.logits is None and out.hardfocus_stats.weights.shape == (batch[0].shape[0],)


def test_deep_copy_and_accelerate_unwrap_compile_too():
    accelerate = pytest.importorskip("accelerate")
    model = apply_hardfocus(tiny_model("llama"), method="irdro", r=0.5, impl="torch")
    batch = left_padded_batch()
    eager = _step(model, batch)
    twin = copy.deepcopy(model)
    assert hardfocus_patch(twin).model is twin
    _assert_same_step(_step(torch.compile(twin, backend="aot_eager"), batch), eager, tol=1e-5)
    unwrapped = accelerate.utils.extract_model_from_parallel(twin, keep_fp32_wrapper=False)
    _assert_same_step(_step(torch.compile(unwrapped, backend="aot_eager"), batch), eager, tol=1e-5)


def test_trainer_with_torch_compile(tmp_path):
    """``TrainingArguments(torch_compile=True)`` for two SGD steps (inductor, on the CPU):
    the same losses and weights as the eager Trainer, up to inductor's rounding."""
    from hf_models import Rows, sgd_args

    results = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = apply_hardfocus(tiny_model("llama"), method="irdro", r=0.5, impl="torch")
        args = sgd_args(tmp_path / str(compiled), 4, 1, torch_compile=compiled)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=Rows())
        trainer.train()
        results[compiled] = (
            [h["loss"] for h in trainer.state.log_history if "loss" in h],
            [p.detach().clone() for p in model.parameters()],
        )
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(results[True][1], results[False][1]):  # inductor fuses (and so rounds) differently
        assert rel_err(a, b) <= 1e-4
