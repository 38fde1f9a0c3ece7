"""TRL's GRPOTrainer with the fused log-probabilities and entropies (HardFocusGRPOTrainer):
on the same batch its loss and gradients equal TRL's own; it trains end to end on a tiny
model with a toy reward on the CPU; what it cannot honour is refused."""

import pytest
import torch

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from hardfocus_fused import apply_hardfocus  # noqa: E402
from hardfocus_fused.hf.trl import HardFocusGRPOTrainer, use_fused_logprobs  # noqa: E402

from hf_models import peaked_llama  # noqa: E402
from reference import rel_err  # noqa: E402


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A tiny Llama and its tokenizer in a folder (TRL builds its reference model from it)."""
    from hardfocus_fused.experiment.corpus import train_builtin_tokenizer

    tokenizer = train_builtin_tokenizer(vocab_size=256)
    model = peaked_llama(tokenizer)  # log-probs and entropies far from uniform
    path = tmp_path_factory.mktemp("grpo-model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path), tokenizer


def _trainer(cls, saved_model, tmp_path, **options):
    path, tokenizer = saved_model
    dataset = datasets.Dataset.from_dict({"prompt": ["the cat sat", "a dog ran", "birds sing at", "rain fell on"]})
    reward = lambda completions, **kwargs: [float(len(set(c.split()))) for c in completions]  # noqa: E731
    args = trl.GRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        max_steps=1,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        **dict(dict(bf16=False), **options),
    )
    return cls(model=path, reward_funcs=reward, args=args, train_dataset=dataset, processing_class=tokenizer)


@pytest.mark.parametrize(
    "options",
    [
        dict(loss_type="grpo", beta=0.04, temperature=0.9),
        dict(loss_type="dapo", epsilon_high=0.28, entropy_coef=0.01),
        dict(loss_type="dr_grpo", temperature=1.3, top_entropy_quantile=0.5),
        # Under bf16 autocast with the head in fp32 on both sides (TRL's bf16 head would round the
        # logits: this head keeps fp32 products on the CPU).
        dict(loss_type="grpo", bf16=True, cast_lm_head_to_fp32=True, entropy_coef=0.01),
    ],
)
def test_loss_and_gradients_equal_trls_on_the_same_batch(saved_model, tmp_path, options):
    theirs = _trainer(trl.GRPOTrainer, saved_model, tmp_path / "trl", **options)
    ours = _trainer(HardFocusGRPOTrainer, saved_model, tmp_path / "ours", **options)
    theirs.model.train()
    ours.model.train()
    torch.manual_seed(1)
    inputs = theirs._prepare_inputs(next(iter(theirs.get_train_dataloader())))  # generation and rewards, once
    results = []
    for trainer in (theirs, ours):
        trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which is not running
        trainer.model.zero_grad(set_to_none=True)
        loss = trainer._compute_loss(trainer.model, inputs)
        loss.backward()
        results.append(
            (loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
        )
    (loss_t, grads_t), (loss_o, grads_o) = results
    assert rel_err(loss_o, loss_t) <= 1e-5
    assert grads_t.keys() == grads_o.keys()
    errors = {name: rel_err(grads_o[name], grads_t[name]) for name in grads_t}
    assert max(errors.values()) <= 1e-4, errors
    logps_t, ent_t, _ = theirs._get_per_token_logps_and_entropies(
        theirs.model,
        torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
        torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1),
        inputs["completion_ids"].size(1),
        compute_entropy=True,
    )
    logps_o, ent_o, _ = ours._get_per_token_logps_and_entropies(
        ours.model,
        torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
        torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1),
        inputs["completion_ids"].size(1),
        compute_entropy=True,
    )
    assert rel_err(logps_o, logps_t) <= 1e-5 and rel_err(ent_o, ent_t) <= 1e-5


def test_trains_end_to_end(saved_model, tmp_path):
    trainer = _trainer(HardFocusGRPOTrainer, saved_model, tmp_path, beta=0.04)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    logged = trainer.state.log_history[0]
    assert logged["entropy"] > 0 and "kl" in logged
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def test_what_the_fused_head_cannot_honour_is_refused(saved_model, tmp_path):
    path, _ = saved_model
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    with pytest.raises(ValueError, match="log_sum_sq_probs"):
        use_fused_logprobs(model, outputs=("log_probs", "log_sum_sq_probs"))
    with pytest.raises(ValueError, match="remove_hardfocus"):
        use_fused_logprobs(apply_hardfocus(model, impl="torch"))
    with pytest.raises(ValueError, match="use_liger_kernel"):
        _trainer(HardFocusGRPOTrainer, saved_model, tmp_path, use_liger_kernel=True)
