"""Backward kernel: recompute logit tiles and push ``dlogits`` through both matmuls.

For token t with upstream coefficient ``coef[t]`` (the per-token gradient of the loss:
``w_seq / n_tokens_seq`` for the weighted loss, 0 for ignored or dropped tokens)

    dlogits[t, v] = coef[t] * (softmax(z[t])[v] - [v == target[t]])      (times 1 - (z/c)^2 with softcap c)
    grad_hidden[t] = dlogits[t] @ W        grad_W = dlogits.T @ hidden     grad_b = dlogits.sum(0)

One program owns a ``BLOCK_N`` x ``BLOCK_V`` tile of ``dlogits``: it recomputes the logits
from the saved log-sum-exp, then walks the hidden dimension ``BLOCK_H`` at a time,
adding its share of ``grad_hidden`` and ``grad_W`` into fp32 buffers with atomic adds
(whose order varies between runs; ``backward_deterministic`` is the reproducible variant).
Only tokens with a non-zero coefficient are visited (they come first in ``order``), so
sequences the weighting dropped cost no matmul work.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .backward_deterministic import deterministic_backward
from .config import KernelConfig
from .tiles import dlogit_tile, logit_tile, mma, token_block, vocab_block
from .types import layout_args, tile_constants


@triton.jit
def _lce_backward_kernel(
    hidden_ptr, weight_ptr, bias_ptr, targets_ptr, order_ptr, n_active_ptr, stats_ptr, coef_ptr,
    grad_hidden_ptr, grad_weight_ptr, grad_bias_ptr,
    n_tokens, n_vocab, n_hidden,
    stride_hn, stride_hh, stride_wv, stride_wh, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    GRAD_HIDDEN: tl.constexpr, GRAD_WEIGHT: tl.constexpr, GRAD_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # A 1-D grid (no 65535 cap on the vocabulary tiles); consecutive programs share a
    # vocabulary tile, so its weight rows are read from L2 by all token blocks.
    n_row_blocks = tl.cdiv(n_tokens, BLOCK_N)
    pid_n = tl.program_id(0) % n_row_blocks
    pid_v = tl.program_id(0) // n_row_blocks
    n_active = tl.load(n_active_ptr)
    if pid_n * BLOCK_N >= n_active:  # a block past the active tokens has nothing to do
        return
    tok, row_mask = token_block(order_ptr, n_active, pid_n, BLOCK_N)
    cols, col_mask = vocab_block(pid_v * BLOCK_V, n_vocab, BLOCK_V)

    z = logit_tile(
        hidden_ptr, weight_ptr, bias_ptr, tok, cols, row_mask, col_mask,
        n_hidden, stride_hn, stride_hh, stride_wv, stride_wh, softcap,
        HAS_BIAS, HAS_SOFTCAP, COMPUTE_DTYPE, DOT_PRECISION, DOT_UPCAST, BLOCK_N, BLOCK_V, BLOCK_H,
    )
    dz = dlogit_tile(z, tok, cols, row_mask, col_mask, targets_ptr, stats_ptr, coef_ptr, softcap, HAS_SOFTCAP)

    if GRAD_BIAS:
        tl.atomic_add(grad_bias_ptr + cols, tl.sum(dz, axis=0), mask=col_mask)
    dz_c = dz.to(COMPUTE_DTYPE)
    # Gradient buffers are contiguous fp32 (N, H) and (V, H).
    gh_rows = grad_hidden_ptr + tok[:, None] * n_hidden
    gw_rows = grad_weight_ptr + cols[:, None] * n_hidden
    h_rows = hidden_ptr + tok[:, None] * stride_hn
    w_rows = weight_ptr + cols[:, None] * stride_wv
    for k0 in range(0, n_hidden, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_mask = ks < n_hidden
        if GRAD_HIDDEN:
            w = tl.load(w_rows + ks[None, :] * stride_wh, mask=col_mask[:, None] & k_mask[None, :], other=0.0)
            gh = mma(dz_c, w.to(COMPUTE_DTYPE), None, DOT_PRECISION, DOT_UPCAST)
            tl.atomic_add(gh_rows + ks[None, :], gh, mask=row_mask[:, None] & k_mask[None, :])
        if GRAD_WEIGHT:
            h = tl.load(h_rows + ks[None, :] * stride_hh, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            gw = mma(tl.trans(dz_c), h.to(COMPUTE_DTYPE), None, DOT_PRECISION, DOT_UPCAST)
            tl.atomic_add(gw_rows + ks[None, :], gw, mask=col_mask[:, None] & k_mask[None, :])


def backward_constants(has_bias: bool, has_softcap: bool, compute_dtype: torch.dtype, config: KernelConfig,
                       need_hidden: bool, need_weight: bool, need_bias: bool) -> dict:
    """The compile-time constants ``_lce_backward_kernel`` is specialised on."""
    return dict(tile_constants(has_bias, has_softcap, compute_dtype, config),
                GRAD_HIDDEN=need_hidden, GRAD_WEIGHT=need_weight, GRAD_BIAS=need_bias)


def lce_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    order: torch.Tensor,
    n_active: torch.Tensor,
    stats: torch.Tensor,
    coef: torch.Tensor,
    softcap: float | None,
    compute_dtype: torch.dtype,
    config: KernelConfig,
    need_hidden: bool = True,
    need_weight: bool = True,
    need_bias: bool = True,
    deterministic: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """fp32 ``(grad_hidden, grad_weight, grad_bias)`` for per-token coefficients ``coef``.

    ``stats`` is the (N, 2) fp32 ``(lse, nll)`` of ``lse_forward``.  ``order[:n_active]`` must list every token whose ``coef`` is non-zero (others may be
    listed too).  Gradients that are not needed are returned as None and cost nothing.
    ``deterministic=True`` runs the atomic-free kernels of ``backward_deterministic``
    (bitwise reproducible, one more logit recompute when both gradients are needed).
    """
    n_tokens, n_hidden = hidden.shape
    n_vocab = weight.shape[0]
    need_bias = need_bias and bias is not None
    device = hidden.device
    grad_hidden = torch.zeros((n_tokens, n_hidden), dtype=torch.float32, device=device) if need_hidden else None
    grad_weight = torch.zeros((n_vocab, n_hidden), dtype=torch.float32, device=device) if need_weight else None
    grad_bias = torch.zeros(n_vocab, dtype=torch.float32, device=device) if need_bias else None
    if not (need_hidden or need_weight or need_bias):
        return grad_hidden, grad_weight, grad_bias
    if deterministic:
        deterministic_backward(hidden, weight, bias, targets, order, n_active, stats, coef, softcap, compute_dtype,
                               config, grad_hidden, grad_weight, grad_bias)
        return grad_hidden, grad_weight, grad_bias
    placeholder = coef  # any fp32 tensor; never dereferenced when its flag is off
    grid = (triton.cdiv(n_tokens, config.block_n) * triton.cdiv(n_vocab, config.block_v),)
    _lce_backward_kernel[grid](
        hidden, weight, bias if bias is not None else hidden, targets, order, n_active, stats, coef,
        grad_hidden if need_hidden else placeholder,
        grad_weight if need_weight else placeholder,
        grad_bias if need_bias else placeholder,
        n_tokens, n_vocab, n_hidden,
        *layout_args(hidden, weight, softcap),
        **backward_constants(bias is not None, softcap is not None, compute_dtype, config,
                             need_hidden, need_weight, need_bias),
        **config.launch_options(),
    )
    return grad_hidden, grad_weight, grad_bias
