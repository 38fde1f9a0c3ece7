"""Models whose forward adds a loss term computed from the logits (Bamba's z-loss) are
refused in one line naming the setting; with it off they patch and train exactly as the
unpatched model; a term of that kind the patch does not know is refused without reporting
a non-finite loss as the reason."""

import copy
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hardfocus_fused import apply_hardfocus  # noqa: E402

from hf_models import COMMON, VOCAB  # noqa: E402


def tiny_bamba(z_loss_coefficient: float):
    config = transformers.BambaConfig(
        **dict(COMMON, num_hidden_layers=2),
        mamba_n_heads=4,
        mamba_d_head=16,
        mamba_d_state=8,
        mamba_n_groups=1,
        attn_layer_indices=[1],
        mamba_chunk_size=16,
        z_loss_coefficient=z_loss_coefficient,
    )
    torch.manual_seed(0)
    return transformers.BambaForCausalLM(config)


def test_bambas_z_loss_is_refused_naming_the_setting():
    with pytest.raises(ValueError) as refusal:
        apply_hardfocus(tiny_bamba(1e-2), impl="torch")
    message = str(refusal.value)
    assert "\n" not in message and "z_loss_coefficient=0.01" in message
    assert "set model.z_loss_coefficient = 0" in message and "lse_square_scale=0.01" in message
    assert not re.search(r"\b(inf|nan)\b", message)


def test_bamba_without_its_z_loss_trains_as_the_unpatched_model():
    model = tiny_bamba(1e-2)
    model.z_loss_coefficient = model.config.z_loss_coefficient = 0.0
    reference = copy.deepcopy(model)
    apply_hardfocus(model, method="mean", impl="torch")
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    ours, theirs = model(input_ids=ids, labels=ids).loss, reference(input_ids=ids, labels=ids).loss
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


class LogitTermLlama(transformers.LlamaForCausalLM):
    """A model adding a term of its logits to the loss that no setting names."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        if out.loss is not None:
            out.loss = out.loss + 1e-3 * out.logits.float().logsumexp(-1).pow(2).mean()
        return out


def test_an_unknown_logit_term_is_refused_without_a_non_finite_reason():
    config = transformers.LlamaConfig(**COMMON)
    torch.manual_seed(0)
    with pytest.raises(ValueError) as refusal:
        apply_hardfocus(LogitTermLlama(config), impl="torch")
    message = str(refusal.value)
    assert "adds a term computed from the logits" in message
    assert not re.search(r"\b(inf|nan)\b", message)
