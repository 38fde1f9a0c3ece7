"""apply_hardfocus on tiny Hugging Face models of every supported family."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import hardfocus_fused.op.torch_path as torch_path  # noqa: E402
from hardfocus_fused import apply_hardfocus, remove_hardfocus  # noqa: E402

from helpers import LargestTensor  # noqa: E402
from hf_models import ARCHITECTURES, VOCAB, left_padded_batch, tiny_model  # noqa: E402
from reference import reference_weights, rel_err  # noqa: E402


def named_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(got, want, tol):
    """Every parameter's gradient within ``tol`` of its largest entry; gradients that are
    zero in exact arithmetic (e.g. attention key biases) are held to the model's scale."""
    assert got.keys() == want.keys()
    floor = 1e-3 * max(w.abs().max().item() for w in want.values())
    for name in want:
        scale = max(want[name].abs().max().item(), floor)
        assert (got[name] - want[name]).abs().max().item() <= tol * scale, name


def reference_from_logits(logits, labels, method, **weighting):
    """Weighted loss computed in fp64 from the unpatched model's logits."""
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    nll = torch.nn.functional.cross_entropy(
        logits.double().transpose(1, 2), targets, reduction="none", ignore_index=-100
    )
    n_tokens = (targets != -100).sum(1)
    seq_loss = nll.sum(1) / n_tokens.clamp_min(1)
    w = reference_weights(
        seq_loss.tolist(),
        n_tokens.tolist(),
        method,
        weighting.get("r", 10.0),
        weighting.get("n1", 0.25),
        weighting.get("n2", 0.25),
        "mean",
    )
    return (torch.tensor(w, dtype=torch.float64) * seq_loss).sum()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_mean_matches_unpatched_model(arch):
    model = tiny_model(arch)
    patched = apply_hardfocus(copy.deepcopy(model), method="mean", impl="torch")
    ids, mask, labels = left_padded_batch()
    want = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    out = patched(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is None
    assert rel_err(out.loss, want) <= 1e-5
    want.backward()
    out.loss.backward()
    assert_same_grads(named_grads(patched), named_grads(model), 1e-4)
    # Without labels: the model's own logits, unchanged.
    torch.testing.assert_close(
        patched(input_ids=ids, attention_mask=mask).logits, model(input_ids=ids, attention_mask=mask).logits
    )


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("method", ["irdro", "midranking"])
def test_weighted_methods_match_reference_from_logits(arch, method):
    model = tiny_model(arch, seed=1)
    reference = copy.deepcopy(model)
    patched = apply_hardfocus(model, method=method, r=0.5, n1=0.25, n2=0.5, impl="torch")
    ids, mask, labels = left_padded_batch(seed=1)
    out = patched(input_ids=ids, attention_mask=mask, labels=labels)
    logits = reference(input_ids=ids, attention_mask=mask).logits
    want = reference_from_logits(logits, labels, method, r=0.5, n1=0.25, n2=0.5)
    assert rel_err(out.loss, want) <= 1e-5
    stats = out.hardfocus_stats
    assert stats.weights.shape == (4,) and abs(stats.weights.sum().item() - 1) < 1e-6
    out.loss.backward()
    want.backward()
    assert_same_grads(named_grads(patched), named_grads(reference), 1e-4)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_logits_never_materialised(arch, monkeypatch):
    model = apply_hardfocus(tiny_model(arch), impl="torch")
    ids, mask, labels = left_padded_batch(batch=4, seq=32)
    logits_bytes = ids.numel() * VOCAB * 4
    monkeypatch.setattr(torch_path, "DEFAULT_CHUNK_BUDGET_BYTES", 16 * VOCAB * 4)  # 16 tokens per chunk
    with LargestTensor() as spy:
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert spy.largest < logits_bytes // 2, (spy.largest, logits_bytes)


@pytest.mark.parametrize("backward_impl", ["auto", "forward"])
def test_triton_path_inside_a_model(backward_impl, triton_device):
    """The model's own loss and gradients, by four products or (``"forward"``, the token
    mean's weights being known up front) three."""
    model = tiny_model("llama").to(triton_device)
    patched = apply_hardfocus(copy.deepcopy(model), method="mean", impl="triton", backward_impl=backward_impl)
    ids, mask, labels = (t.to(triton_device) for t in left_padded_batch())
    want = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    got = patched(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert rel_err(got, want) <= 1e-5
    want.backward()
    got.backward()
    assert_same_grads(named_grads(patched), named_grads(model), 1e-4)


def test_forward_gradients_refused_for_loss_dependent_weights():
    with pytest.raises(ValueError, match="backward_impl='forward'"):
        apply_hardfocus(tiny_model("llama"), method="irdro", backward_impl="forward")


def test_transformers_kwargs():
    model = tiny_model("llama")
    patched = apply_hardfocus(copy.deepcopy(model), method="mean", impl="torch")
    ids, mask, labels = left_padded_batch()
    position_ids = (mask.cumsum(1) - 1).clamp_min(0)
    common = dict(input_ids=ids, attention_mask=mask, position_ids=position_ids)
    # num_items_in_batch: the sum over the step's targets, as the Trainer passes it.
    want = model(**common, labels=labels, num_items_in_batch=torch.tensor(100)).loss
    got = patched(**common, labels=labels, num_items_in_batch=torch.tensor(100)).loss
    assert rel_err(got, want) <= 1e-5
    # shift_labels: already shifted labels.
    shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    want = model(**common, labels=labels, shift_labels=shifted).loss
    got = patched(**common, labels=labels, shift_labels=shifted).loss
    assert rel_err(got, want) <= 1e-5
    # logits_to_keep with labels: the kept positions are scored.
    got = patched(**common, labels=labels, logits_to_keep=5).loss
    logits = model(**common).logits[:, -5:]
    want = torch.nn.functional.cross_entropy(logits.transpose(1, 2), shifted[:, -5:], ignore_index=-100)
    assert rel_err(got, want) <= 1e-5
    # return_dict=False: (loss, ...) without logits.
    out = patched(**common, labels=labels, return_dict=False)
    assert rel_err(out[0], model(**common, labels=labels).loss) <= 1e-5


def test_packed_documents_are_weighted_separately():
    model = tiny_model("llama")
    patched = apply_hardfocus(copy.deepcopy(model), method="irdro", r=0.5, impl="torch")
    collator = transformers.DataCollatorWithFlattening()
    gen = torch.Generator().manual_seed(3)
    docs = [torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in (7, 5, 9)]
    batch = collator([{"input_ids": d} for d in docs])
    out = patched(**batch)
    assert out.hardfocus_stats.weights.shape == (3,)  # one weight per document, not per row
    # Reference from the unpatched model's logits on the same packed row, split by document.
    # (Whether attention crosses documents is the model's business: flash-attention's varlen
    # path isolates them; the eager path used here does not.  The weighting is ours.)
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0].double()
    targets = batch["labels"][0, 1:]
    nll = torch.nn.functional.cross_entropy(logits[:-1], targets, reduction="none", ignore_index=-100)
    bounds = [(0, 6), (7, 11), (12, 20)]  # predicting positions of each document, from lengths 7, 5, 9
    seq = torch.stack([nll[a:b].sum() / (targets[a:b] != -100).sum() for a, b in bounds])
    want = (torch.softmax(seq / 0.5, 0).detach() * seq).sum()
    assert rel_err(out.loss, want) <= 1e-5


def test_gradient_checkpointing_and_lora():
    peft = pytest.importorskip("peft")
    model = tiny_model("gpt2")
    model.gradient_checkpointing_enable()
    config = peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True)  # GPT-2's Conv1D
    torch.manual_seed(5)
    reference = peft.get_peft_model(copy.deepcopy(model), config)
    torch.manual_seed(5)
    lora = apply_hardfocus(peft.get_peft_model(model, config), method="mean", impl="torch")
    ids, mask, labels = left_padded_batch()
    reference.train()
    lora.train()
    want = reference(input_ids=ids, attention_mask=mask, labels=labels).loss
    got = lora(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert rel_err(got, want) <= 1e-5
    want.backward()
    got.backward()
    grads = named_grads(lora)
    assert grads and all("lora_" in name for name in grads)  # the frozen head gets no gradient
    assert_same_grads(grads, named_grads(reference), 1e-4)


def test_remove_restores_the_model():
    model = tiny_model("gemma2")
    ids, mask, labels = left_padded_batch()
    before = model(input_ids=ids, labels=labels)
    apply_hardfocus(model)
    assert model(input_ids=ids, labels=labels).logits is None
    remove_hardfocus(model)
    after = model(input_ids=ids, labels=labels)
    torch.testing.assert_close(after.logits, before.logits)
    torch.testing.assert_close(after.loss, before.loss)


def test_unknown_logit_transform_is_refused():
    model = tiny_model("llama")
    model.lm_head.register_forward_hook(lambda module, args, out: out.clamp(-0.05, 0.05))
    with pytest.raises(ValueError, match="cannot patch LlamaForCausalLM"):
        apply_hardfocus(model)
    assert model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).logits is not None


def test_undeclared_scale_is_measured_in_fp32():
    model = tiny_model("llama")
    reference = copy.deepcopy(model)
    for m in (model, reference):
        m.lm_head.register_forward_hook(lambda module, args, out: out * 3.0)
    apply_hardfocus(model, method="mean", impl="torch")
    ids, mask, labels = left_padded_batch()
    assert rel_err(model(input_ids=ids, labels=labels).loss, reference(input_ids=ids, labels=labels).loss) <= 1e-5


def test_lora_on_the_head_is_refused():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(TypeError, match="lm_head"):
        apply_hardfocus(model)


def test_deepcopy_of_a_patched_model_uses_its_own_weights():
    model = apply_hardfocus(tiny_model("llama"), method="mean", impl="torch")
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.lm_head.weight.mul_(2.0)
    ids, mask, labels = left_padded_batch()
    out = twin(input_ids=ids, labels=labels)
    assert out.logits is None
    remove_hardfocus(twin)
    assert rel_err(out.loss, twin(input_ids=ids, labels=labels).loss) <= 1e-5
    assert rel_err(out.loss, model(input_ids=ids, labels=labels).loss) > 1e-2


@pytest.mark.parametrize("change", ["labels", "ignore_index"])
def test_a_forward_that_changes_the_loss_arguments_is_refused(change):
    """lm_head computes the loss from the labels the model was called with; a forward that
    hands loss_function other labels (or another ignore_index) gets an error, not a loss
    on the wrong targets."""
    model = apply_hardfocus(tiny_model("llama"), impl="torch")
    ids, mask, labels = left_padded_batch()
    patched = model.loss_function

    def altered(logits, labels, *args, **kwargs):
        if change == "labels":
            return patched(logits, labels.roll(1, dims=1), *args, **kwargs)
        return patched(logits, labels, *args, ignore_index=0, **kwargs)

    model.loss_function = altered
    with pytest.raises(ValueError, match=change):
        model(input_ids=ids, attention_mask=mask, labels=labels)
