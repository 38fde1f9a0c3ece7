"""The low-level ``linear_cross_entropy`` op: reductions, arbitrary upstream gradients,
and the kernels' vocabulary split."""

import pytest
import torch

from hardfocus_fused import linear_cross_entropy
from hardfocus_fused.kernels import backward_fused as backward_module
from hardfocus_fused.kernels.config import KernelConfig
from hardfocus_fused.op.dispatch import token_nll

from helpers import TOLERANCES, device_for, grads_of, make_batch
from reference import reference_token_nll, rel_err

IMPLS = ["torch", "triton"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shift", [False, True])
def test_per_token_nll_with_arbitrary_upstream_gradient(impl, shift, triton_device):
    h, w, b, labels = make_batch(3, 10, 36, 75, device=device_for(impl, triton_device), seed=11)
    nll = linear_cross_entropy(h, w, labels, reduction="none", bias=b, shift=shift, softcap=6.0, impl=impl)
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1) if shift else labels
    ref = reference_token_nll(h, w, targets, b, softcap=6.0)
    assert nll.shape == labels.shape and nll.dtype == torch.float32
    assert rel_err(nll, ref) <= 1e-5
    assert torch.all(nll[targets == -100] == 0)
    upstream = torch.randn(labels.shape, generator=torch.Generator().manual_seed(1)).to(nll.device)
    got = torch.autograd.grad(nll, (h, w, b), upstream)
    want = torch.autograd.grad(ref, (h, w, b), upstream.double())
    for g, r in zip(got, want):
        assert rel_err(g, r) <= 1e-4


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_reductions(impl, reduction, triton_device):
    h, w, b, labels = make_batch(2, 8, 20, 30, device=device_for(impl, triton_device), seed=12)
    h2, labels2 = h.reshape(16, 20), labels.reshape(16)  # 2-D hidden works too
    got = linear_cross_entropy(h2, w, labels2, bias=b, reduction=reduction, impl=impl)
    want = torch.nn.functional.cross_entropy((h2 @ w.T + b).double(), labels2, reduction=reduction)
    assert rel_err(got, want) <= 1e-5
    assert rel_err(grads_of(got, (h2, w))[1], grads_of(want, (h2, w))[1]) <= 1e-4


@pytest.mark.parametrize("impl", IMPLS)
def test_mean_without_targets_is_zero(impl, triton_device):
    h, w, b, labels = make_batch(2, 4, 16, 20, device=device_for(impl, triton_device))
    labels[:] = -100
    assert linear_cross_entropy(h, w, labels, reduction="mean", impl=impl).item() == 0.0


@pytest.mark.parametrize("splits", [2, 3])
def test_vocabulary_split_merges_exactly(splits, triton_device):
    # 5 vocabulary tiles of 16 over 3 splits: the last split is shorter; V=70 is ragged.
    h, w, b, labels = make_batch(2, 12, 32, 70, device=triton_device, seed=13)
    config = KernelConfig(block_n=16, block_v=16, block_h=16, vocab_splits=splits)
    flat, targets = h.reshape(-1, 32), labels.reshape(-1)
    nll = token_nll(flat, w, targets, b, -100, None, "triton", kernel_config=config)
    ref = reference_token_nll(flat, w, targets, b)
    assert rel_err(nll, ref) <= 1e-5
    got = torch.autograd.grad(nll.sum(), (h, w, b))
    want = torch.autograd.grad(ref.sum(), (h, w, b))
    for g, r in zip(got, want):
        assert rel_err(g, r) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_weight_gradient_chunks_match_reference(dtype, triton_device, monkeypatch):
    # V=70 in chunks of 48 rows (three 16-column tiles): two launches, the second ragged.
    launches = []
    real_launch = backward_module._launch
    monkeypatch.setattr(backward_module, "_launch", lambda *args: launches.append(args[-2:]) or real_launch(*args))
    h, w, b, labels = make_batch(2, 12, 32, 70, dtype=dtype, device=triton_device, seed=14)
    config = KernelConfig(block_n=16, block_v=16, block_h=16, weight_grad_chunk_bytes=48 * 32 * 4 + 100)
    flat, targets = h.reshape(-1, 32), labels.reshape(-1)
    nll = token_nll(flat, w, targets, b, -100, 5.0, "triton", kernel_config=config)
    ref = reference_token_nll(flat, w, targets, b, softcap=5.0)
    upstream = torch.rand(targets.shape, generator=torch.Generator().manual_seed(0)).to(triton_device)
    got = torch.autograd.grad((nll * upstream).sum(), (h, w, b))
    want = torch.autograd.grad((ref * upstream.double()).sum(), (h, w, b))
    assert launches == [(0, 48), (48, 70)]
    assert [g.dtype for g in got] == [dtype] * 3
    for g, r in zip(got, want):
        assert rel_err(g, r) <= TOLERANCES[dtype][1]


@pytest.mark.parametrize(
    "field,value",
    [("block_v", 48), ("block_n", 8), ("fp32_precision", "fp16"), ("vocab_splits", -1), ("weight_grad_chunk_bytes", 0)],
)
def test_kernel_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=f"KernelConfig.{field}"):
        KernelConfig(**{field: value})
