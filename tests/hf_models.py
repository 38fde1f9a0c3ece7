"""Tiny randomly initialised Hugging Face causal LMs built from configs (no downloads).

Dropout is off everywhere, so a patched and an unpatched copy see the same activations in
training mode (gradient checkpointing only runs in training mode)."""

from __future__ import annotations

import torch

VOCAB = 384
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    attn_implementation="eager",
)


def _configs():
    import transformers as tf

    return {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, COMMON),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM, COMMON),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, COMMON),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(COMMON, head_dim=8)),
        "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM, dict(COMMON, head_dim=8)),
        # A small soft-cap so that it bends the logits of a random model.
        "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, dict(COMMON, head_dim=8, final_logit_softcapping=0.5)),
        "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, dict(COMMON, pad_token_id=0)),
        # word_embed_proj_dim < hidden_size gives OPT-350m's project_in / project_out.
        "opt": (
            tf.OPTConfig,
            tf.OPTForCausalLM,
            dict(
                vocab_size=VOCAB,
                hidden_size=32,
                ffn_dim=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                word_embed_proj_dim=16,
                max_position_embeddings=64,
                dropout=0.0,
                attention_dropout=0.0,
                attn_implementation="eager",
            ),
        ),
        "gpt2": (
            tf.GPT2Config,
            tf.GPT2LMHeadModel,
            dict(
                vocab_size=VOCAB,
                n_embd=32,
                n_layer=2,
                n_head=4,
                n_positions=64,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                attn_implementation="eager",
            ),
        ),
        "gpt_neox": (
            tf.GPTNeoXConfig,
            tf.GPTNeoXForCausalLM,
            dict(
                vocab_size=VOCAB,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                attn_implementation="eager",
            ),
        ),
    }


ARCHITECTURES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "opt", "gpt2", "gpt_neox"]


def tiny_model(name: str, seed: int = 0):
    config_cls, model_cls, kwargs = _configs()[name]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs))
    # Larger output weights than the init's 0.02 so the losses differ between sequences.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)
    return model


def left_padded_batch(batch=4, seq=12, seed=0):
    """input_ids, attention_mask and labels with left padding (as the paper's code pads)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for row, pad in enumerate([0, 3, 5, 1][:batch]):
        mask[row, :pad] = 0
        ids[row, :pad] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


class Rows(torch.utils.data.Dataset):
    """Fixed-length rows with a few padded (-100) label positions."""

    def __init__(self, n=16, seq=12):
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, VOCAB, (n, seq), generator=gen)
        self.labels = self.ids.clone()
        self.labels[::3, :4] = -100

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def sgd_args(out, batch_size, accumulation, args_class=None, **overrides):
    """Two logged steps of plain SGD with large steps and no clipping: the updates show any
    error in the gradients' scale, which Adam's normalisation and clipping would hide (and
    Adam would turn round-off in near-zero gradients into full steps).  ``args_class``: the
    arguments' class (TRL's configs), ``transformers.TrainingArguments`` by default."""
    options = dict(
        output_dir=str(out),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=2,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        optim="sgd",
        learning_rate=1.0,
        max_grad_norm=0.0,
    )
    if args_class is None:
        import transformers

        args_class = transformers.TrainingArguments
    return args_class(**dict(options, **overrides))


def peaked_llama(tokenizer, seed=0):
    """A tiny Llama for ``tokenizer``'s vocabulary whose head is scaled up 20 times: a
    peaked policy, whose log-probs and entropies are far from uniform."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model
