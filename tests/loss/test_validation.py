"""Bad input raises a clear error naming the argument, before any kernel runs."""

import pytest
import torch

from hardfocus_fused import HardFocusLoss, hardfocus_loss, linear_cross_entropy

from helpers import make_batch


@pytest.fixture
def batch():
    return make_batch(2, 6, 8, 12)


@pytest.mark.parametrize(
    "kwargs,error,word",
    [
        (dict(method="topk"), ValueError, "method"),
        (dict(r=0.0), ValueError, "r must"),
        (dict(r=float("nan")), ValueError, "r must"),
        (dict(n1=1.5), ValueError, "n1"),
        (dict(n2=-0.1), ValueError, "n2"),
        (dict(seq_reduction="max"), ValueError, "seq_reduction"),
        (dict(impl="cuda"), ValueError, "impl"),
        (dict(softcap=0.0), ValueError, "softcap"),
        (dict(ignore_index=3.0), TypeError, "ignore_index"),
        (dict(shift="yes"), TypeError, "shift must be a bool or an int"),
        (dict(shift=1.5), TypeError, "shift must be a bool or an int"),
        (dict(shift=-1), ValueError, "shift must be >= 0"),
    ],
)
def test_bad_options(batch, kwargs, error, word):
    h, w, b, labels = batch
    with pytest.raises(error, match=word):
        hardfocus_loss(h, w, labels, bias=b, **kwargs)


def test_bad_tensors(batch):
    h, w, b, labels = batch
    with pytest.raises(ValueError, match="hidden must have 3"):
        hardfocus_loss(h[0], w, labels)
    with pytest.raises(ValueError, match="hidden size"):
        hardfocus_loss(h, w[:, :5], labels)
    with pytest.raises(ValueError, match="labels must have shape"):
        hardfocus_loss(h, w, labels[:, :3])
    with pytest.raises(TypeError, match="labels must be an integer"):
        hardfocus_loss(h, w, labels.float())
    with pytest.raises(ValueError, match=r"labels contains 12, outside \[0, 12\)"):
        hardfocus_loss(h, w, torch.full_like(labels, 12))
    with pytest.raises(ValueError, match="labels contains -7"):
        hardfocus_loss(h, w, torch.full_like(labels, -7))
    with pytest.raises(ValueError, match="bias has 5"):
        hardfocus_loss(h, w, labels, bias=b[:5])
    with pytest.raises(TypeError, match="hidden must be float"):
        hardfocus_loss(h.int(), w, labels)
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        hardfocus_loss(h, None, labels)
    with pytest.raises(ValueError, match="targets must have shape"):
        linear_cross_entropy(h, w, labels[0], reduction="none")
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, labels, reduction="avg")


def test_module_checks_options_at_construction():
    with pytest.raises(ValueError, match="method"):
        HardFocusLoss(method="bottom")


def test_triton_on_cpu_without_interpreter_is_a_clear_error(batch, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    h, w, b, labels = batch
    with pytest.raises(ValueError, match="impl='triton' needs CUDA tensors"):
        hardfocus_loss(h, w, labels, impl="triton")


def test_validate_false_skips_only_the_value_check(batch):
    h, w, b, labels = batch
    torch.testing.assert_close(hardfocus_loss(h, w, labels, validate=False), hardfocus_loss(h, w, labels))
    # An out-of-range label is no longer caught by the check (here torch's own indexing fails).
    with pytest.raises(Exception) as failure:
        hardfocus_loss(h, w, torch.full_like(labels, 12), validate=False, impl="torch")
    assert "labels contains" not in str(failure.value)
    with pytest.raises(ValueError, match="labels must have shape"):
        hardfocus_loss(h, w, labels[:, :2], validate=False)  # shapes are still checked


def test_sequence_weights_checks_its_inputs():
    from hardfocus_fused import sequence_weights

    with pytest.raises(ValueError, match="seq_loss and n_tokens must be 1-D of the same length"):
        sequence_weights(torch.ones(3), torch.ones(4, dtype=torch.long))
    with pytest.raises(TypeError, match="seq_loss and n_tokens"):
        sequence_weights([1.0, 2.0], torch.ones(2, dtype=torch.long))
    assert sequence_weights(torch.ones(0), torch.ones(0, dtype=torch.long)).shape == (0,)


def test_integer_shift_on_the_op_is_checked(batch):
    h, w, b, labels = batch
    with pytest.raises(TypeError, match="shift"):
        linear_cross_entropy(h, w, labels, reduction="none", shift="yes")
    with pytest.raises(ValueError, match="shift"):
        HardFocusLoss(shift=-2)


def test_attention_mask_needs_position_ids(batch):
    h, w, b, labels = batch
    with pytest.raises(ValueError, match="attention_mask is only used with position_ids"):
        hardfocus_loss(h, w, labels, attention_mask=torch.ones_like(labels))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        hardfocus_loss(
            h, w, labels, position_ids=torch.zeros_like(labels), attention_mask=torch.ones(2, 3, dtype=torch.long)
        )
