"""No (tokens x V) tensor is ever allocated, and zero-coefficient tokens cost no backward work."""

import pytest
import torch

import hardfocus_fused.kernels.backward_fused as kernel_backward
import hardfocus_fused.op.torch_path as torch_path
from hardfocus_fused import hardfocus_loss
from hardfocus_fused.kernels.config import KernelConfig
from hardfocus_fused.op.dispatch import token_nll

from helpers import LargestTensor, make_batch


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_no_logits_tensor_forward_or_backward(impl, triton_device, monkeypatch):
    # 4 x 32 tokens, V=600, H=16: fp32 logits would take 307,200 bytes, grad_weight 38,400.
    n_tokens, vocab = 4 * 32, 600
    h, w, b, labels = make_batch(
        4, 32, 16, vocab, device=triton_device if impl == "triton" else "cpu", dead=False, ragged=False
    )
    # torch path: allow 20 tokens of fp32 logits per chunk.
    monkeypatch.setattr(torch_path, "DEFAULT_CHUNK_BUDGET_BYTES", 20 * vocab * 4)
    with LargestTensor() as spy:
        loss = hardfocus_loss(h, w, labels, bias=b, impl=impl)
        loss.backward()
    limit = 4 * (20 * vocab if impl == "torch" else vocab * 16)
    assert spy.largest <= limit < 4 * n_tokens * vocab // 6


def test_half_precision_weight_gradient_is_accumulated_in_chunks(triton_device):
    # A bf16 head of V=600 x H=16: a whole-vocabulary fp32 accumulator would take 38,400
    # bytes; with 128-row chunks the largest tensor is the bf16 weight (or its gradient).
    vocab, n_hidden = 600, 16
    h, w, b, labels = make_batch(
        4, 32, n_hidden, vocab, dtype=torch.bfloat16, device=triton_device, bias=False, dead=False, ragged=False
    )
    config = KernelConfig(block_n=32, block_v=64, block_h=16, weight_grad_chunk_bytes=128 * n_hidden * 4)
    flat, targets = h.reshape(-1, n_hidden), labels.reshape(-1)
    nll = token_nll(flat, w, targets, None, -100, None, "triton", kernel_config=config)
    with LargestTensor() as spy:
        nll.sum().backward()
    assert w.grad.dtype == torch.bfloat16
    assert spy.largest <= vocab * n_hidden * 2 < vocab * n_hidden * 4


def test_triton_backward_visits_only_weighted_tokens(triton_device, monkeypatch):
    # MidRanking over 8 sequences keeps 2: only their target tokens may enter the backward.
    seen = {}
    original = kernel_backward.lce_backward

    def spy(*args, **kwargs):
        seen["n_active"] = int(args[0].n_active.item())
        return original(*args, **kwargs)

    monkeypatch.setattr(kernel_backward, "lce_backward", spy)
    h, w, b, labels = make_batch(8, 6, 16, 40, device=triton_device, ragged=False, dead=False)
    loss = hardfocus_loss(h, w, labels, method="midranking", impl="triton")
    loss.backward()
    assert seen["n_active"] == 2 * 5


def test_torch_backward_visits_only_weighted_tokens(monkeypatch):
    rows = []
    original = torch_path._logits

    def spy(h, *args):
        rows.append(h.shape[0])
        return original(h, *args)

    monkeypatch.setattr(torch_path, "_logits", spy)
    h, w, b, labels = make_batch(8, 6, 16, 40, ragged=False, dead=False)
    loss = hardfocus_loss(h, w, labels, method="midranking", impl="torch")
    forward_rows = sum(rows)
    loss.backward()
    assert forward_rows == 8 * 5 and sum(rows) - forward_rows == 2 * 5
