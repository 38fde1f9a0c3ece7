"""The loss options and the data's weights through apply_hardfocus and the Trainer."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from hardfocus_fused import HardFocusCallback, apply_hardfocus, hardfocus_loss, hardfocus_patch  # noqa: E402
from hardfocus_fused.hf.trainer import WeightColumns  # noqa: E402

from helpers import assert_same_updates, state_of  # noqa: E402
from hf_models import VOCAB, Rows, left_padded_batch, sgd_args, tiny_model  # noqa: E402
from reference import rel_err  # noqa: E402


def test_trainer_label_smoothing_moves_into_the_fused_loss(tmp_path):
    """Trainer(label_smoothing_factor=0.1) with HardFocusCallback.attach: the labels reach
    the model and method="mean" trains exactly like the stock Trainer's label smoothing."""
    model = tiny_model("llama")
    patched = apply_hardfocus(copy.deepcopy(model), method="mean", impl="torch")
    before = state_of(model)
    runs = {}
    for name, m in (("stock", model), ("ours", patched)):
        trainer = transformers.Trainer(
            model=m, args=sgd_args(tmp_path / name, 4, 2, label_smoothing_factor=0.1), train_dataset=Rows()
        )
        if name == "ours":
            HardFocusCallback.attach(trainer)
            assert trainer.label_smoother is None
        trainer.train()
        runs[name] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    torch.testing.assert_close(runs["ours"], runs["stock"], rtol=1e-5, atol=1e-6)
    assert_same_updates(before, state_of(patched), state_of(model))


def test_options_through_the_patch():
    model = tiny_model("gemma2")
    reference = copy.deepcopy(model)
    weights = torch.rand(VOCAB, generator=torch.Generator().manual_seed(0)) + 0.5
    apply_hardfocus(
        model, method="mean", impl="torch", label_smoothing=0.1, class_weight=weights, lse_square_scale=1e-4
    )
    ids, mask, labels = left_padded_batch()
    got = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    logits = reference(input_ids=ids, attention_mask=mask).logits.double()
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    flat, t = logits.reshape(-1, VOCAB), targets.reshape(-1)
    ce = torch.nn.functional.cross_entropy(
        flat, t, weight=weights.double(), reduction="none", ignore_index=-100, label_smoothing=0.1
    )
    valid = t != -100
    z = 1e-4 * torch.logsumexp(flat, -1)[valid] ** 2
    # Liger's definition: the class weights weigh the cross-entropy, the z-loss is a token mean.
    want = ce[valid].sum() / weights.double()[t[valid]].sum() + z.sum() / valid.sum()
    assert rel_err(got, want) <= 1e-5


def test_weight_columns_reach_the_loss():
    model = apply_hardfocus(tiny_model("llama"), method="irdro", r=0.5, impl="torch")
    ids, mask, labels = left_padded_batch()
    token_weight = torch.rand(ids.shape, generator=torch.Generator().manual_seed(1))
    sample_weight = torch.tensor([1.0, 2.0, 0.5, 1.0])
    out = model(
        input_ids=ids, attention_mask=mask, labels=labels, token_weight=token_weight, sample_weight=sample_weight
    )
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    want = hardfocus_loss(
        hidden,
        model.lm_head.weight,
        labels,
        method="irdro",
        r=0.5,
        impl="torch",
        token_weight=token_weight,
        sample_weight=sample_weight,
    )
    assert rel_err(out.loss, want) <= 1e-6
    plain = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert rel_err(out.loss, plain) > 1e-3


class WeightedRows(torch.utils.data.Dataset):
    """Rows of different lengths with per-token and per-example weights."""

    def __init__(self, n=8):
        gen = torch.Generator().manual_seed(2)
        self.items = []
        for i in range(n):
            length = 6 + (i * 3) % 7
            ids = torch.randint(1, VOCAB, (length,), generator=gen).tolist()
            self.items.append(
                {
                    "input_ids": ids,
                    "token_weight": torch.rand(length, generator=gen).tolist(),
                    "sample_weight": 0.5 + i % 3,
                }
            )

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_trainer_keeps_and_pads_the_weight_columns(tmp_path):
    from hardfocus_fused.experiment.corpus import train_builtin_tokenizer

    tokenizer = train_builtin_tokenizer(vocab_size=VOCAB)
    model = apply_hardfocus(tiny_model("llama"), method="irdro", r=0.5, impl="torch")
    collator = WeightColumns(
        transformers.DataCollatorForLanguageModeling(tokenizer, mlm=False), padding_side=tokenizer.padding_side
    )
    seen = []
    patch = hardfocus_patch(model)
    real = patch.compute

    def spy(hidden, call, options):
        seen.append({"token_weight": call.token_weight, "sample_weight": call.sample_weight, "labels": call.labels})
        return real(hidden, call, options)

    patch.compute = spy
    args = sgd_args(tmp_path, 4, 1, max_steps=1)  # remove_unused_columns stays on (the default)
    transformers.Trainer(model=model, args=args, train_dataset=WeightedRows(), data_collator=collator).train()
    batch = seen[0]
    assert batch["sample_weight"].shape == (4,) and batch["token_weight"].shape == batch["labels"].shape
    padded = batch["labels"] == -100
    assert (batch["token_weight"][padded] == 0).all() and (batch["token_weight"][~padded] > 0).all()
