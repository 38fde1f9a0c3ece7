"""Both Triton backward strategies against the fp64 reference, and the launch geometry
(grouped program order, whole-wave vocabulary splits)."""

import dataclasses

import pytest
import torch

from hardfocus_fused import hardfocus_loss
from hardfocus_fused.kernels import backward_matmul
from hardfocus_fused.kernels.config import HeadConfigs, KernelConfig, whole_wave_splits
from hardfocus_fused.op.dispatch import token_nll

from helpers import TOLERANCES, assert_matches_reference, grads_of, make_batch
from reference import reference_token_nll, rel_err

STRATEGIES = ["fused", "matmul"]


@pytest.mark.parametrize("backward_impl", STRATEGIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["irdro", "midranking"])
def test_strategies_match_reference(backward_impl, dtype, method, triton_device):
    h, w, b, labels = make_batch(4, 9, 40, 83, dtype=dtype, device=triton_device, seed=21)
    assert_matches_reference(
        h, w, b, labels, method=method, r=0.5, softcap=6.0, impl="triton", backward_impl=backward_impl
    )


@pytest.mark.parametrize("backward_impl", STRATEGIES)
def test_frozen_head_and_no_bias(backward_impl, triton_device):
    h, w, b, labels = make_batch(3, 8, 32, 70, device=triton_device, seed=22, bias=False)
    w.requires_grad_(False)
    assert_matches_reference(h, w, None, labels, method="irdro", impl="triton", backward_impl=backward_impl)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_chunks_cover_the_vocabulary(dtype, triton_device, monkeypatch):
    """A budget of 32 columns of fp32 logits: V=150 in chunks of 32 columns (the last
    ragged), the weight gradient in row blocks of 16; the per-token upstream gradient is
    arbitrary and some tokens have none (they are not gathered)."""
    h, w, b, labels = make_batch(2, 12, 24, 150, dtype=dtype, device=triton_device, seed=23)
    flat, targets = h.reshape(-1, 24), labels.reshape(-1)
    upstream = torch.rand(targets.shape, generator=torch.Generator().manual_seed(1)).to(triton_device)
    upstream[::5] = 0.0
    live = int(((targets != -100) & (upstream != 0)).sum())
    config = HeadConfigs.of(KernelConfig(block_n=16, block_v=16, block_h=16))
    # 32 columns of fp32 logits per chunk; weight rows: 4 * live * 32 // (4 * 24) -> 16.
    config = dataclasses.replace(config, matmul_chunk_bytes=4 * live * 32)
    products = []
    real_mm = backward_matmul._mm
    monkeypatch.setattr(
        backward_matmul, "_mm", lambda a, b_, **k: products.append(tuple(a.shape)) or real_mm(a, b_, **k)
    )
    nll = token_nll(flat, w, targets, b, -100, 3.0, "triton", kernel_config=config, backward_impl="matmul")
    ref = reference_token_nll(flat, w, targets, b, softcap=3.0)
    got = torch.autograd.grad((nll * upstream).sum(), (h, w, b))
    want = torch.autograd.grad((ref * upstream.double()).sum(), (h, w, b))
    assert products.count((live, 24)) == 5  # ceil(150 / 32) recomputes, live tokens only
    assert products.count((16, live)) == 9 and products.count((6, live)) == 1  # weight rows 16+16, last 16+6
    for g, r in zip(got, want):
        assert g.dtype == dtype
        assert rel_err(g, r) <= TOLERANCES[dtype][1]


def test_matmul_strategy_is_deterministic(triton_device):
    h, w, b, labels = make_batch(3, 10, 32, 90, device=triton_device, seed=24)
    runs = []
    for _ in range(2):
        loss = hardfocus_loss(h, w, labels, bias=b, impl="triton", backward_impl="matmul")
        runs.append(grads_of(loss, (h, w, b)))
    for a, c in zip(*runs):
        assert torch.equal(a, c)


def test_backward_impl_is_checked():
    h, w, b, labels = make_batch(2, 5, 8, 12)
    with pytest.raises(ValueError, match="backward_impl"):
        hardfocus_loss(h, w, labels, backward_impl="cublas")


@pytest.mark.parametrize("group_n", [1, 3, 8])
def test_grouped_order_visits_every_tile_once(group_n, triton_device):
    """7 token blocks of 16 (the last group ragged for group_n=3) x 5 vocabulary tiles or
    3 splits: gradients and NLL exact whatever the grouping."""
    h, w, b, labels = make_batch(4, 28, 32, 70, device=triton_device, seed=25, ragged=False, dead=False)
    flat, targets = h.reshape(-1, 32), labels.reshape(-1)  # 112 tokens: 7 blocks of 16
    config = KernelConfig(block_n=16, block_v=16, block_h=32, group_n=group_n, vocab_splits=3)
    nll = token_nll(flat, w, targets, b, -100, None, "triton", kernel_config=config)
    ref = reference_token_nll(flat, w, targets, b)
    assert rel_err(nll, ref) <= 1e-5
    for g, r in zip(torch.autograd.grad(nll.sum(), (h, w, b)), torch.autograd.grad(ref.sum(), (h, w, b))):
        assert rel_err(g, r) <= 1e-4


@pytest.mark.parametrize(
    "row_blocks,tiles,sms,want",
    [
        (16, 1002, 132, 8),  # N=1024, 64-token blocks, Llama-3 vocabulary: one wave at 97%
        (8, 1002, 132, 15),  # 128-token blocks: 120 programs, 91%
        (64, 2000, 132, 2),  # Gemma-2 head, N=8192: 128 programs
        (128, 1002, 132, 1),  # N=16384: the token blocks fill the wave
        (1000, 1002, 132, 1),
        (16, 5, 132, 5),  # a tiny vocabulary: as many splits as tiles
        (16, 1002, None, 1),  # no device size (CPU)
    ],
)
def test_whole_wave_splits(row_blocks, tiles, sms, want):
    assert whole_wave_splits(row_blocks, tiles, sms) == want


def test_kernel_config_group_is_checked():
    with pytest.raises(ValueError, match="KernelConfig.group_n"):
        KernelConfig(group_n=0)
    with pytest.raises(TypeError, match="kernel_config"):
        HeadConfigs.of({"block_n": 16})


def test_widened_matmuls_on_a_gpu_warn_once(monkeypatch):
    """Where the half-precision matmul with an fp32 result is missing on a GPU, the
    "matmul" backward says once that it runs on widened fp32 copies (same products)."""
    monkeypatch.setattr(backward_matmul, "_wants_out_dtype", lambda a: True)  # as on CUDA
    monkeypatch.setitem(backward_matmul._WIDENED, "warned", False)
    a = torch.randn(8, 16, dtype=torch.bfloat16)
    b = torch.randn(16, 4, dtype=torch.bfloat16)
    with pytest.warns(RuntimeWarning, match="widened fp32 copies, several times slower"):
        product = backward_matmul._mm(a, b)
    torch.testing.assert_close(product, a.float() @ b.float())
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backward_matmul._mm(a, b)  # once per process


def test_fp32_heads_follow_torchs_matmul_precision(monkeypatch):
    from hardfocus_fused.kernels import config

    monkeypatch.setattr(config, "interpreter_active", lambda: False)  # the compiled defaults
    precision = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert {
            c.fp32_precision
            for c in (
                config.default_configs(4096, 32000, 4096, torch.float32).forward,
                config.default_configs(4096, 32000, 4096, torch.float32).backward,
            )
        } == {"ieee"}
        torch.set_float32_matmul_precision("high")
        configs = config.default_configs(4096, 32000, 4096, torch.float32)
        assert configs.forward.fp32_precision == configs.deterministic.fp32_precision == "tf32"
        assert config.default_configs(4096, 32000, 4096, torch.bfloat16).forward.fp32_precision == "ieee"
    finally:
        torch.set_float32_matmul_precision(precision)


def test_defaults_follow_the_architecture(monkeypatch):
    """Each GPU gets its architecture's tiles: Hopper's 3-stage 128 x 128 backward needs
    more shared memory than a block has on sm_86/89/120, and Hopper's 128 x 128 forward
    spills with mma.sync."""
    from hardfocus_fused.kernels import config

    monkeypatch.setattr(config, "interpreter_active", lambda: False)
    assert [config.architecture(c).name for c in (75, 80, 87, 89, 90, 103, 121, None)] == [
        "sm_80",
        "sm_80",
        "sm_86",
        "sm_89",
        "sm_90a",
        "sm_100a",
        "sm_120",
        "sm_90a",
    ]
    shape = (16384, 128256, 4096, torch.bfloat16)
    hopper, ada = config.default_configs(*shape, 90), config.default_configs(*shape, 89)
    assert hopper == config.default_configs(*shape) and hopper.backward.num_stages == 3
    assert ada.backward.num_stages == 2 and ada.forward_for(entropy=True).block_v == 64
    assert ada.forward.block_h == 32 and hopper.forward.block_v == 256 and hopper.forward_for(True).block_v == 128
    small = config.default_configs(512, 128256, 4096, torch.bfloat16, 90)
    assert small.forward_for(True) == small.forward and small.forward.block_n == 64
    assert config.default_configs(*shape[:3], torch.float32, 86).backward.block_v == 32
