"""Compiled-kernel tests at realistic sizes; they run only where CUDA is available."""

import pytest
import torch

from hardfocus_fused import hardfocus_loss, linear_cross_entropy

from helpers import TOLERANCES, grads_of
from reference import reference_loss, rel_err

pytestmark = pytest.mark.gpu


def head_batch(batch, seq, hidden, vocab, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    h = torch.randn(batch, seq, hidden, device="cuda", generator=gen).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, device="cuda", generator=gen) / hidden**0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (batch, seq), device="cuda", generator=gen)
    labels[0, : seq // 2] = -100
    return h, w, labels


@pytest.mark.parametrize("backward_impl", ["fused", "matmul"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("method", ["irdro", "midranking", "mean"])
def test_default_configs_match_reference(dtype, method, backward_impl):
    h, w, labels = head_batch(8, 256, 512, 32003, dtype)
    loss, stats = hardfocus_loss(
        h, w, labels, method=method, impl="triton", return_stats=True, backward_impl=backward_impl
    )
    ref, ref_seq, ref_w, _ = reference_loss(h, w, labels, method=method)
    tol_loss, tol_grad = TOLERANCES[dtype]
    assert rel_err(loss, ref) <= tol_loss
    assert rel_err(stats.weights, ref_w) <= max(tol_loss, 1e-6)
    for g, r in zip(grads_of(loss, (h, w)), grads_of(ref, (h, w))):
        assert rel_err(g, r) <= tol_grad


def test_small_token_count_uses_vocabulary_splits():
    # 64 tokens are one row block: the forward must split the vocabulary to fill the GPU.
    h, w, labels = head_batch(1, 64, 256, 50000, torch.bfloat16, seed=1)
    nll = linear_cross_entropy(h, w, labels, reduction="none", impl="triton")
    ref = torch.nn.functional.cross_entropy(
        (h.double() @ w.double().T)[0], labels[0], reduction="none", ignore_index=-100
    )
    assert rel_err(nll[0], ref) <= 2e-3


def test_frozen_head_and_softcap():
    h, w, labels = head_batch(4, 128, 256, 20000, torch.bfloat16, seed=2)
    loss = hardfocus_loss(h, w.detach(), labels, softcap=30.0, impl="triton")
    ref, *_ = reference_loss(h, w.detach(), labels, softcap=30.0)
    assert rel_err(grads_of(loss, (h,))[0], grads_of(ref, (h,))[0]) <= 2e-2


def test_no_logits_sized_allocation():
    h, w, labels = head_batch(4, 1024, 256, 64000, torch.bfloat16, seed=3)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    hardfocus_loss(h, w, labels, impl="triton").backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    logits_bytes = 4 * 1024 * 64000 * 2
    grad_buffers = (64000 * 256 + 4 * 1024 * 256) * (4 + 2)  # fp32 accumulators + outputs
    assert extra < grad_buffers + logits_bytes // 100


def test_half_precision_weight_gradient_needs_no_fp32_copy():
    # bf16 head of 64000 x 256 (a 32.8 MB gradient) in fp32 chunks of 8 MiB: the backward's
    # extra memory is the bf16 gradient, the hidden-state gradient (fp32 sum + bf16) and one
    # chunk, not a 65.5 MB fp32 copy of the weight gradient on top.
    import dataclasses

    from hardfocus_fused.kernels.config import default_config
    from hardfocus_fused.op.dispatch import token_nll

    n_tokens, n_hidden, vocab = 4096, 256, 64000
    h, w, labels = head_batch(4, 1024, n_hidden, vocab, torch.bfloat16, seed=6)
    config = dataclasses.replace(
        default_config(n_tokens, vocab, n_hidden, torch.bfloat16), weight_grad_chunk_bytes=8 * 2**20
    )
    nll = token_nll(h.view(n_tokens, n_hidden), w, labels.view(-1), None, -100, None, "triton", kernel_config=config)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    nll.sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    allowed = vocab * n_hidden * 2 + n_tokens * n_hidden * (4 + 2) + 8 * 2**20 + 2**20
    assert extra <= allowed < vocab * n_hidden * (4 + 2)
    ref = torch.nn.functional.cross_entropy(
        h.view(n_tokens, n_hidden).double() @ w.double().T, labels.view(-1), reduction="sum", ignore_index=-100
    )
    for g, r in zip((h.grad, w.grad), grads_of(ref, (h, w))):
        assert rel_err(g, r) <= TOLERANCES[torch.bfloat16][1]


def test_deterministic_gradients_are_bitwise_reproducible():
    h, w, labels = head_batch(8, 512, 1024, 32000, torch.bfloat16, seed=4)
    runs = [grads_of(hardfocus_loss(h, w, labels, impl="triton", deterministic=True), (h, w)) for _ in range(3)]
    for first, *others in zip(*runs):
        assert all(torch.equal(first, other) for other in others)
    ref, *_ = reference_loss(h, w, labels)
    for g, r in zip(runs[0], grads_of(ref, (h, w))):
        assert rel_err(g, r) <= TOLERANCES[torch.bfloat16][1]


@pytest.mark.parametrize(
    "n_tokens,n_hidden,n_vocab",
    [
        (17_000, 64, 131_072),  # N x V = 2.2e9 logits
        (2**21 + 64, 1024, 64),  # N x H = 2.1e9 hidden elements: row offsets past 2**31
    ],
)
def test_index_space_beyond_int32(n_tokens, n_hidden, n_vocab):
    h, w, labels = head_batch(1, n_tokens, n_hidden, n_vocab, torch.bfloat16, seed=5)
    got = linear_cross_entropy(h, w, labels, reduction="none", impl="triton")
    want = linear_cross_entropy(
        h, w, labels, reduction="none", impl="torch"
    )  # chunked fp32, independent of the kernels
    assert rel_err(got, want) <= 2e-3
    upstream = torch.rand_like(got)
    for g, r in zip(grads_of((got * upstream).sum(), (h, w)), grads_of((want * upstream).sum(), (h, w))):
        assert rel_err(g, r) <= 2e-2


def test_hf_patch_in_bf16_on_the_gpu():
    import copy

    pytest.importorskip("transformers")
    from hardfocus_fused import apply_hardfocus

    from hf_models import left_padded_batch, tiny_model

    model = tiny_model("gemma2").to("cuda", torch.bfloat16)
    patched = apply_hardfocus(copy.deepcopy(model), method="mean")  # impl="auto": Triton on CUDA
    ids, mask, labels = (t.cuda() for t in left_padded_batch())
    want = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    got = patched(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert rel_err(got, want) <= 2e-2


def test_matmul_strategy_uses_fp32_accumulating_library_matmuls():
    """On CUDA the "matmul" backward multiplies half-precision operands with fp32 output
    (``out_dtype``), not widened copies; it matches the fused backward's gradients."""
    from hardfocus_fused.kernels import backward_matmul

    h, w, labels = head_batch(4, 512, 1024, 50000, torch.bfloat16, seed=5)
    grads = {}
    for backward_impl in ("fused", "matmul"):
        loss = hardfocus_loss(h, w, labels, impl="triton", backward_impl=backward_impl)
        grads[backward_impl] = grads_of(loss, (h, w))
    assert backward_matmul.widened_matmuls() == 0
    for a, b in zip(grads["fused"], grads["matmul"]):
        assert rel_err(a, b) <= 1e-2
