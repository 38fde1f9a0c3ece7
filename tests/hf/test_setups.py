"""The setups people train with: autocast, accelerate, the Trainer's options, TRL, and
clear refusals for what the patch cannot do (instead of a crash or a silent bypass)."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from hardfocus_fused import (  # noqa: E402
    HardFocusCallback,
    apply_hardfocus,
    hardfocus_loss,
    hardfocus_patch,
    linear_cross_entropy,
    remove_hardfocus,
)

from helpers import TOLERANCES, device_for, grads_of, make_batch, state_of  # noqa: E402
from hf_models import VOCAB, Rows, left_padded_batch, peaked_llama, sgd_args, tiny_model  # noqa: E402
from reference import reference_loss, rel_err  # noqa: E402

# -- autocast --------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loss_under_autocast(impl, dtype, triton_device):
    """fp32 inputs under autocast: the torch path computes in fp32 (fp32 accuracy), the
    Triton path multiplies in the autocast dtype (its accuracy); gradients stay fp32."""
    device = device_for(impl, triton_device)
    h, w, b, labels = make_batch(3, 9, 32, 80, device=device)
    with torch.autocast(torch.device(device).type, dtype=dtype):
        loss = hardfocus_loss(h, w, labels, bias=b, impl=impl, method="irdro", r=0.5)
        got = grads_of(loss, (h, w, b))  # a backward inside the autocast region, too
    # The reference multiplies what the path multiplies: the inputs, or their autocast
    # rounding (the bias is added in fp32).
    ref_dtype = torch.float32 if impl == "torch" else dtype
    rh, rw = (t.detach().to(ref_dtype).requires_grad_() for t in (h, w))
    rb = b.detach().clone().requires_grad_()
    want_loss = reference_loss(rh, rw, labels, bias=rb, method="irdro", r=0.5)[0]
    want = grads_of(want_loss, (rh, rw, rb))
    tol_loss, tol_grad = TOLERANCES[ref_dtype]
    assert loss.dtype == torch.float32
    assert rel_err(loss, want_loss) <= tol_loss
    for g, r in zip(got, want):
        assert g.dtype == torch.float32
        assert rel_err(g, r) <= tol_grad


def test_autocast_lowers_the_triton_matmuls_only(triton_device):
    """Under bf16 autocast the Triton path gives what it gives for bf16-rounded inputs (the
    products autocast's lm_head would form); the torch path what it gives outside autocast."""
    h, w, b, labels = make_batch(2, 7, 32, 64, device=triton_device, bias=False)
    with torch.autocast(torch.device(triton_device).type, dtype=torch.bfloat16):
        inside = linear_cross_entropy(h, w, labels, reduction="none", impl="triton")
    rounded = linear_cross_entropy(h.bfloat16(), w.bfloat16(), labels, reduction="none", impl="triton")
    torch.testing.assert_close(inside, rounded, rtol=1e-5, atol=1e-5)
    h, w, b, labels = make_batch(2, 7, 32, 64, bias=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = linear_cross_entropy(h, w, labels, reduction="none", impl="torch")
    torch.testing.assert_close(
        inside, linear_cross_entropy(h, w, labels, reduction="none", impl="torch"), rtol=0, atol=0
    )


def test_patched_model_under_autocast():
    model = tiny_model("llama")
    patched = apply_hardfocus(copy.deepcopy(model), method="mean", impl="torch")
    ids, mask, labels = left_padded_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        got = patched(input_ids=ids, attention_mask=mask, labels=labels).loss
    got.backward()
    assert got.dtype == torch.float32
    # The backbone runs in bf16 in both; the model's own head multiplies in bf16, ours in fp32.
    assert rel_err(got, want) <= 2e-2
    assert all(p.grad.dtype == torch.float32 for p in patched.parameters() if p.grad is not None)


def test_trainer_with_bf16_autocast(tmp_path):
    """``Trainer(bf16=True)`` on the CPU: accelerate wraps the patched forward in autocast."""
    model = tiny_model("llama")
    patched = apply_hardfocus(copy.deepcopy(model), method="mean", impl="torch")
    before = state_of(model)
    runs = {}
    for name, m in (("stock", model), ("ours", patched)):
        args = sgd_args(tmp_path / name, 4, 1, bf16=True, learning_rate=0.1)
        trainer = transformers.Trainer(model=m, args=args, train_dataset=Rows())
        trainer.train()
        runs[name] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(runs["ours"]) == 2
    torch.testing.assert_close(runs["ours"], runs["stock"], rtol=2e-2, atol=0)

    def moved(state):
        return sum((state[k] - before[k]).abs().sum().item() for k in before)

    assert moved(state_of(patched)) == pytest.approx(moved(state_of(model)), rel=0.1)


# -- the patch is never bypassed silently --------------------------------------------------------


@pytest.mark.parametrize(
    "option,message",
    [
        (
            dict(label_smoothing_factor=0.1),
            r"the Trainer has label_smoothing_factor=0.1.*HardFocusCallback.attach\(trainer\)",
        ),
        (
            dict(
                compute_loss_func=lambda outputs, labels, num_items_in_batch=None: (
                    outputs.logits.float().logsumexp(-1).mean()
                )
            ),
            r"the Trainer has a compute_loss_func.*drop it",
        ),
    ],
)
def test_trainer_options_that_drop_the_labels_are_refused(option, message, tmp_path):
    """Refused before any step, in a short message naming the setting that is on and its fix."""
    model = apply_hardfocus(tiny_model("llama"), impl="torch")
    before = state_of(model)
    args_option = {k: v for k, v in option.items() if k != "compute_loss_func"}
    trainer = transformers.Trainer(
        model=model,
        args=sgd_args(tmp_path, 4, 1, **args_option),
        train_dataset=Rows(),
        compute_loss_func=option.get("compute_loss_func"),
    )
    with pytest.raises(ValueError, match=message) as refused:
        trainer.train()
    text = str(refused.value)
    assert len(text) < 300
    if "label_smoothing_factor" in option:
        assert "compute_loss_func" not in text  # only the setting that is on
    assert all(torch.equal(before[k], v) for k, v in state_of(model).items())  # no step was taken


def test_logits_without_labels_are_fine_until_a_foreign_loss_is_backpropagated():
    model = apply_hardfocus(tiny_model("llama"), impl="torch")
    ids, mask, labels = left_padded_batch()
    logits = model(input_ids=ids, attention_mask=mask).logits  # training mode, with grad: inspecting is fine
    assert logits.shape == (*ids.shape, VOCAB)
    with pytest.raises(ValueError, match="outside the hardfocus patch"):
        logits.logsumexp(-1).mean().backward()
    with hardfocus_patch(model).disabled():  # the documented way out
        model(input_ids=ids, attention_mask=mask).logits.logsumexp(-1).mean().backward()
    assert model.lm_head.weight.grad is not None
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()  # patched again after the block


def _sft_setup(tmp_path):
    trl = pytest.importorskip("trl")
    from hardfocus_fused.experiment.corpus import train_builtin_tokenizer

    tokenizer = train_builtin_tokenizer(vocab_size=256)
    model = peaked_llama(tokenizer)
    import datasets

    # One batch of four: whatever order the sampler draws, the (order-independent) weighted
    # loss of the first step is that of these four sequences.
    texts = [
        "the cat sat on the mat",
        "a dog ran in the park today",
        "birds sing at dawn and dusk",
        "rain fell on the quiet town",
    ]
    dataset = datasets.Dataset.from_dict({"text": texts})
    args = sgd_args(
        tmp_path, 4, 1, args_class=trl.SFTConfig, learning_rate=0.5, max_length=16, gradient_checkpointing=False
    )
    return trl, model, tokenizer, dataset, args


def test_stock_sft_trainer_is_refused(tmp_path):
    trl, model, tokenizer, dataset, args = _sft_setup(tmp_path)
    apply_hardfocus(model, impl="torch")
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    with pytest.raises(ValueError, match="HardFocusSFTTrainer"):
        trainer.train()


def test_hardfocus_sft_trainer_trains_on_the_weighted_loss(tmp_path):
    trl, model, tokenizer, dataset, args = _sft_setup(tmp_path)
    from hardfocus_fused.hf.trl import HardFocusSFTTrainer

    apply_hardfocus(model, method="irdro", r=0.5, impl="torch")
    trainer = HardFocusSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    HardFocusCallback.attach(trainer)
    batch = next(iter(trainer.get_train_dataloader()))
    assert args.bf16  # TRL's default: the patch runs under bf16 autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(**batch).loss
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all("hardfocus/max_weight" in h for h in logs)
    # The first logged loss is the weighted loss of the first batch (IR-DRO, r=0.5).
    assert logs[0]["loss"] == pytest.approx(expected.item(), rel=1e-4)
    assert logs[0]["hardfocus/max_weight"] > 0.26  # not uniform over the 4 sequences


def test_hardfocus_sft_trainer_reads_sample_weights_from_the_dataset(tmp_path):
    trl, model, tokenizer, dataset, args = _sft_setup(tmp_path)
    from hardfocus_fused.hf.trl import HardFocusSFTTrainer

    dataset = dataset.add_column("sample_weight", [1.0, 4.0, 0.5, 2.0])
    apply_hardfocus(model, method="irdro", r=0.5, impl="torch")
    trainer = HardFocusSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    assert sorted(batch["sample_weight"].tolist()) == [0.5, 1.0, 2.0, 4.0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(**batch).loss
        unweighted = model(**{k: v for k, v in batch.items() if k != "sample_weight"}).loss
    trainer.train()
    first = next(h for h in trainer.state.log_history if "loss" in h)
    assert first["loss"] == pytest.approx(expected.item(), rel=1e-4)
    assert abs(expected.item() - unweighted.item()) > 1e-3


def test_hardfocus_sft_trainer_needs_a_patched_model(tmp_path):
    trl, model, tokenizer, dataset, args = _sft_setup(tmp_path)
    from hardfocus_fused.hf.trl import HardFocusSFTTrainer

    trainer = HardFocusSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    with pytest.raises(ValueError, match="apply_hardfocus"):
        trainer.train()


# -- accelerate ------------------------------------------------------------------------------


def test_accelerate_unwrap_without_fp32_wrapper_keeps_the_patch():
    from accelerate import Accelerator

    model = apply_hardfocus(tiny_model("llama"), method="mean", impl="torch")
    reference = copy.deepcopy(model)
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    prepared = accelerator.prepare(model)
    unwrapped = accelerator.unwrap_model(prepared, keep_fp32_wrapper=False)
    ids, mask, labels = left_padded_batch()
    out = unwrapped(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is None and hardfocus_patch(unwrapped) is not None
    assert rel_err(out.loss, reference(input_ids=ids, attention_mask=mask, labels=labels).loss) <= 1e-5
    generated = unwrapped.generate(ids[:1, -4:], max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 7)


def test_forward_keeps_the_model_signature():
    """The model's own parameters, plus the data's weight columns (so that the Trainer keeps
    them), keyword-only before **kwargs."""
    import inspect

    model = tiny_model("llama")
    want = list(inspect.signature(model.forward).parameters.values())
    apply_hardfocus(model, impl="torch")
    got = list(inspect.signature(model.forward).parameters.values())
    columns = [p for p in got if p.name in ("token_weight", "sample_weight")]
    assert [p for p in got if p not in columns] == want
    assert [p.kind for p in columns] == [inspect.Parameter.KEYWORD_ONLY] * 2 and got[-1].kind == want[-1].kind


# -- clear refusals ------------------------------------------------------------------------------

_V = 96


def _unsupported():
    tf = transformers
    common = dict(vocab_size=_V, d_model=16, decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=32)
    return {
        "bart": lambda: tf.BartForCausalLM(
            tf.BartConfig(
                **common, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32, max_position_embeddings=32
            )
        ),
        "trocr": lambda: tf.TrOCRForCausalLM(tf.TrOCRConfig(**common, max_position_embeddings=32)),
        "whisper": lambda: tf.WhisperForCausalLM(
            tf.WhisperConfig(
                **common,
                encoder_layers=1,
                encoder_attention_heads=2,
                encoder_ffn_dim=32,
                max_target_positions=32,
                max_source_positions=32,
                num_mel_bins=8,
                pad_token_id=0,
                bos_token_id=1,
                eos_token_id=2,
                decoder_start_token_id=1,
            )
        ),
        "xlnet": lambda: tf.XLNetLMHeadModel(
            tf.XLNetConfig(vocab_size=_V, d_model=16, n_layer=1, n_head=2, d_inner=32)
        ),
        "reformer": lambda: tf.ReformerModelWithLMHead(
            tf.ReformerConfig(
                vocab_size=_V,
                hidden_size=16,
                num_attention_heads=2,
                attention_head_size=8,
                attn_layers=["local"],
                axial_pos_embds=False,
                max_position_embeddings=64,
                feed_forward_size=32,
                is_decoder=True,
                local_attn_chunk_length=4,
                chunk_size_lm_head=2,
            )
        ),
    }


@pytest.mark.parametrize("arch", ["bart", "trocr", "whisper", "xlnet", "reformer"])
def test_unsupported_architectures_are_refused_at_patch_time(arch):
    model = _unsupported()[arch]()
    with pytest.raises(ValueError, match=f"cannot patch {type(model).__name__}.*not supported"):
        apply_hardfocus(model, impl="torch")
    assert hardfocus_patch(model) is None


@pytest.mark.parametrize(
    "make,what",
    [
        (
            lambda: transformers.BertForMaskedLM(
                transformers.BertConfig(
                    vocab_size=_V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
                )
            ),
            r"BertForMaskedLM is not a causal language model: it is a masked language model \(the bert causal LM is "
            r"BertLMHeadModel\)",
        ),
        (
            lambda: transformers.BertForSequenceClassification(
                transformers.BertConfig(
                    vocab_size=_V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
                )
            ),
            "not a causal language model",
        ),
    ],
)
def test_models_that_are_not_causal_lms_are_named_so(make, what):
    model = make()
    with pytest.raises(ValueError, match=what) as refused:
        apply_hardfocus(model, impl="torch")
    assert "probe" not in str(refused.value)


def test_patching_twice_warns_and_keeps_one_patch():
    model = apply_hardfocus(tiny_model("llama"), method="irdro", impl="torch")
    with pytest.warns(
        UserWarning, match="already patched by apply_hardfocus \\(method='irdro'\\); that patch is replaced"
    ):
        apply_hardfocus(model, method="midranking", impl="torch")
    assert hardfocus_patch(model).options.weighting.method == "midranking"
    ids, _, labels = left_padded_batch()
    model(input_ids=ids, labels=labels).loss.backward()


def test_a_model_name_is_refused():
    with pytest.raises(TypeError, match="AutoModelForCausalLM.from_pretrained"):
        apply_hardfocus("facebook/opt-125m")


def test_lora_on_the_head_names_the_adapter():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(TypeError, match="PEFT adapter.*target_modules"):
        apply_hardfocus(model)


@pytest.mark.parametrize("change", ["lora", "resize"])
def test_a_head_changed_after_patching_is_refused_at_the_next_forward(change):
    peft = pytest.importorskip("peft")
    model = apply_hardfocus(tiny_model("llama"), impl="torch")
    if change == "lora":
        model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["lm_head", "q_proj"]))
    else:
        model.resize_token_embeddings(VOCAB + 8)
    ids, mask, labels = left_padded_batch()
    with pytest.raises(ValueError, match="replaced after apply_hardfocus"):
        model(input_ids=ids, attention_mask=mask, labels=labels)
    if change == "resize":  # patching again follows the new head
        apply_hardfocus(model, impl="torch")
        assert model(input_ids=ids, attention_mask=mask, labels=labels).logits is None


def test_nearest_declared_logit_scale_is_chosen():
    """Cohere with logit_scale=1.01: 1.0 and 1.01 are both within the probe's 2%, and the
    nearest (1.01) is the right one."""
    config = transformers.CohereConfig(
        vocab_size=_V,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        logit_scale=1.01,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = transformers.CohereForCausalLM(config)
    reference = copy.deepcopy(model)
    apply_hardfocus(model, method="mean", impl="torch")
    assert hardfocus_patch(model).scale == 1.01
    ids = torch.randint(0, _V, (2, 10))
    assert rel_err(model(input_ids=ids, labels=ids).loss, reference(input_ids=ids, labels=ids).loss) <= 1e-6


def test_moe_tuple_output_keeps_aux_loss():
    config = transformers.MixtralConfig(
        vocab_size=_V,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=4,
        num_experts_per_tok=2,
        output_router_logits=True,
    )
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config)
    reference = copy.deepcopy(model)
    apply_hardfocus(model, method="mean", impl="torch")
    ids = torch.randint(0, _V, (2, 10))
    ours = model(input_ids=ids, labels=ids, return_dict=False, use_cache=False)
    theirs = reference(input_ids=ids, labels=ids, return_dict=False, use_cache=False)
    # (loss, aux_loss, logits, router_logits) for the model; ours the same without the logits.
    assert len(ours) == len(theirs) - 1
    assert rel_err(ours[0], theirs[0]) <= 1e-5
    torch.testing.assert_close(ours[1], theirs[1])
    assert not any(isinstance(x, torch.Tensor) and x.shape[-1:] == (0,) for x in ours)


# -- left padding with generate-style position ids ------------------------------------------------


def _generate_style(mask):
    """Position ids as ``generate`` builds them: cumsum - 1, padding filled with 1."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


@pytest.mark.parametrize("with_mask", [True, False])
def test_generate_style_position_ids_do_not_split_rows(with_mask):
    model = tiny_model("llama")
    patched = apply_hardfocus(copy.deepcopy(model), method="mean", impl="torch")
    ids, mask, labels = left_padded_batch()
    position_ids = _generate_style(mask)
    inputs = dict(input_ids=ids, position_ids=position_ids, labels=labels)
    want = model(**inputs, attention_mask=mask).loss
    out = patched(**inputs, attention_mask=mask if with_mask else None)
    if not with_mask:  # without a mask the model attends to the padding; compare against that
        want = model(**inputs).loss
    assert rel_err(out.loss, want) <= 1e-5
    assert out.hardfocus_stats.weights.shape == (4,)  # one sequence per row


def test_padding_never_starts_a_document():
    from hardfocus_fused.tokens import document_starts

    pos = torch.tensor(
        [
            [1, 1, 0, 1, 2, 0, 1],  # generate-style left padding, then two documents
            [510, 511, 0, 1, 2, 3, 4],  # a row that begins inside a document: two pieces
            [0, 0, 0, 0, 1, 2, 3],
        ]
    )  # left padding clamped to 0
    want = torch.tensor([[1, 0, 0, 0, 0, 1, 0], [1, 0, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(document_starts(pos), want)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7, [0, 0, 0, 1, 1, 1, 1]])
    assert torch.equal(document_starts(pos, mask), want)
    # right padding whose position ids restart at 0 is not a document either
    assert torch.equal(
        document_starts(torch.tensor([[0, 1, 2, 0, 0]]), torch.tensor([[1, 1, 1, 0, 0]])),
        torch.tensor([[1, 0, 0, 0, 0]], dtype=torch.bool),
    )


# -- evaluation ------------------------------------------------------------------------------


def test_trainer_evaluate_reports_the_plain_loss_and_gives_logits(tmp_path):
    model = tiny_model("llama")
    patched = apply_hardfocus(copy.deepcopy(model), method="irdro", r=0.5, impl="torch")
    seen = {}

    def metrics(prediction):
        seen["shape"] = prediction.predictions.shape
        return {"n": float(prediction.predictions.shape[0])}

    results = {}
    for name, m in (("stock", model), ("ours", patched)):
        trainer = transformers.Trainer(
            model=m,
            args=sgd_args(tmp_path / name, 4, 1, per_device_eval_batch_size=4),
            eval_dataset=Rows(n=8),
            compute_metrics=metrics,
        )
        if name == "ours":
            HardFocusCallback.attach(trainer)
        results[name] = trainer.evaluate()
        assert seen.pop("shape") == (8, 12, VOCAB)
    ours, stock = results["ours"], results["stock"]
    assert ours["eval_loss"] == pytest.approx(stock["eval_loss"], rel=1e-5)
    assert ours["eval_hardfocus/weighted_loss"] > ours["eval_loss"]  # IR-DRO leans on the harder rows
    assert "hardfocus/max_weight" not in ours


def test_evaluation_without_logits():
    model = apply_hardfocus(tiny_model("llama"), method="irdro", impl="torch", eval_logits=False)
    ids, mask, labels = left_padded_batch()
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        remove_hardfocus(model)
        want = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert out.logits is None
    assert rel_err(out.loss, want) <= 1e-5
