"""Backward kernel: recompute logit tiles and push ``dlogits`` through both matmuls.

For token t with upstream coefficient ``coef[t]`` (the per-token gradient of the loss:
``w_seq / n_tokens_seq`` for the weighted loss, 0 for ignored or dropped tokens)

    dlogits[t, v] = coef[t] * (softmax(z[t])[v] - [v == target[t]])      (times 1 - (z/c)^2 with softcap c)
    grad_hidden[t] = dlogits[t] @ W        grad_W = dlogits.T @ hidden     grad_b = dlogits.sum(0)

One program owns a ``BLOCK_N`` x ``BLOCK_V`` tile of ``dlogits``: it recomputes the logits
from the saved log-sum-exp, then walks the hidden dimension ``BLOCK_H`` at a time,
adding its share of ``grad_hidden`` and ``grad_W`` into fp32 buffers with atomic adds.
The adds are relaxed (``sem="relaxed"``): the sums need no ordering against other memory
operations, and relaxed adds compile to plain reductions (``RED``) where the default
acquire-release semantics wrap each one in memory barriers.  Their order varies between
runs; ``backward_deterministic`` is the reproducible variant.
For a half-precision head the vocabulary is covered in chunks, so that the fp32 weight
accumulator stays small (``weight_chunk_rows``).
Only tokens with a non-zero coefficient are visited (they come first in ``order``), so
sequences the weighting dropped cost no matmul work.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .backward_deterministic import deterministic_backward
from .problem import HeadProblem
from .tiles import dlogit_tile, grouped_tile, logit_tile, mma, to_compute, token_block, vocab_block


@triton.jit
def _lce_backward_kernel(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    class_weight_ptr,
    targets_ptr,
    order_ptr,
    n_active_ptr,
    stats_ptr,
    coef_ptr,
    grad_hidden_ptr,
    grad_weight_ptr,
    grad_bias_ptr,
    n_tokens,
    v_start,
    v_stop,
    n_hidden,
    stride_hn,
    stride_hh,
    stride_wv,
    stride_wh,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    RICH_COEF: tl.constexpr,
    CLASS_WEIGHT: tl.constexpr,
    ENTROPY: tl.constexpr,
    GRAD_HIDDEN: tl.constexpr,
    GRAD_WEIGHT: tl.constexpr,
    GRAD_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    GROUP_N: tl.constexpr,
):
    # One launch covers the vocabulary columns [v_start, v_stop); grad_weight_ptr points at
    # the fp32 accumulator of exactly those rows.  A 1-D grid (no 65535 cap on the
    # vocabulary tiles) in grouped order (tiles.grouped_tile): a wave of programs covers
    # GROUP_N token blocks x a few vocabulary tiles, so GROUP_N programs at a time add into
    # one grad_weight tile and the grad_hidden rows being added to stay few, in L2.
    n_tiles = tl.cdiv(v_stop - v_start, BLOCK_V)
    pid_n, pid_v = grouped_tile(tl.program_id(0), tl.cdiv(n_tokens, BLOCK_N), n_tiles, GROUP_N)
    n_active = tl.load(n_active_ptr)
    if pid_n * BLOCK_N >= n_active:  # a block past the active tokens has nothing to do
        return
    tok, row_mask = token_block(order_ptr, n_active, pid_n, BLOCK_N)
    cols, col_mask = vocab_block(v_start + pid_v * BLOCK_V, v_stop, BLOCK_V)

    z = logit_tile(
        hidden_ptr,
        weight_ptr,
        bias_ptr,
        tok,
        cols,
        row_mask,
        col_mask,
        n_hidden,
        stride_hn,
        stride_hh,
        stride_wv,
        stride_wh,
        softcap,
        HAS_BIAS,
        HAS_SOFTCAP,
        COMPUTE_DTYPE,
        DOT_PRECISION,
        DOT_UPCAST,
        BLOCK_N,
        BLOCK_V,
        BLOCK_H,
    )
    dz = dlogit_tile(
        z,
        tok,
        cols,
        row_mask,
        col_mask,
        targets_ptr,
        stats_ptr,
        coef_ptr,
        class_weight_ptr,
        softcap,
        HAS_SOFTCAP,
        RICH_COEF,
        CLASS_WEIGHT,
        ENTROPY,
    )

    if GRAD_BIAS:
        tl.atomic_add(grad_bias_ptr + cols, tl.sum(dz, axis=0), mask=col_mask, sem="relaxed")
    dz_c = to_compute(dz, COMPUTE_DTYPE, DOT_UPCAST)
    # Gradient buffers are contiguous fp32: (N, H) and (v_stop - v_start, H).
    gh_rows = grad_hidden_ptr + tok[:, None] * n_hidden
    gw_rows = grad_weight_ptr + (cols - v_start)[:, None] * n_hidden
    h_rows = hidden_ptr + tok[:, None] * stride_hn
    w_rows = weight_ptr + cols[:, None] * stride_wv
    for k0 in range(0, n_hidden, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_mask = ks < n_hidden
        if GRAD_HIDDEN:
            w = tl.load(w_rows + ks[None, :] * stride_wh, mask=col_mask[:, None] & k_mask[None, :], other=0.0)
            gh = mma(dz_c, to_compute(w, COMPUTE_DTYPE, DOT_UPCAST), None, DOT_PRECISION, DOT_UPCAST)
            tl.atomic_add(gh_rows + ks[None, :], gh, mask=row_mask[:, None] & k_mask[None, :], sem="relaxed")
        if GRAD_WEIGHT:
            h = tl.load(h_rows + ks[None, :] * stride_hh, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            gw = mma(tl.trans(dz_c), to_compute(h, COMPUTE_DTYPE, DOT_UPCAST), None, DOT_PRECISION, DOT_UPCAST)
            tl.atomic_add(gw_rows + ks[None, :], gw, mask=col_mask[:, None] & k_mask[None, :], sem="relaxed")


def weight_chunk_rows(problem: HeadProblem) -> int:
    """Vocabulary rows per launch of the atomic backward.

    The weight gradient is summed in fp32.  For an fp32 head that sum is the gradient
    itself (one launch).  For a half-precision head a full fp32 accumulator would take twice
    the gradient's own memory (and the final cast a copy on top): instead the vocabulary
    is covered in chunks whose fp32 accumulator fits ``config.weight_grad_chunk_bytes``,
    each rounded into the gradient as soon as its launch is done.  Every (token block,
    vocabulary tile) pair is still visited exactly once, so chunking adds no matmul work.
    """
    if problem.weight.dtype == torch.float32:
        return problem.n_vocab
    block_v = problem.config.block_v
    rows = problem.config.weight_grad_chunk_bytes // (4 * problem.n_hidden) // block_v * block_v
    return min(problem.n_vocab, max(block_v, rows))


def lce_backward(
    problem: HeadProblem,
    stats: torch.Tensor,
    coef: torch.Tensor,
    need_hidden: bool = True,
    need_weight: bool = True,
    need_bias: bool = True,
    deterministic: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(grad_hidden, grad_weight, grad_bias)`` for per-token coefficients ``coef`` (N,) fp32.

    ``stats`` is the (N, 2) fp32 ``(lse, nll)`` of ``lse_forward``; the active tokens of
    ``problem`` must include every token whose ``coef`` is non-zero.  Gradients are summed
    in fp32 and returned in the dtypes of ``hidden``, ``weight`` and ``bias``; those not
    needed are None and cost nothing.  ``deterministic=True`` runs the atomic-free kernels
    of ``backward_deterministic`` (bitwise reproducible, one more logit recompute when
    both gradients are needed, and a whole-vocabulary fp32 weight accumulator).
    """
    need_bias = need_bias and problem.bias is not None
    grad_hidden = _fp32_zeros(problem, problem.n_tokens, problem.n_hidden) if need_hidden else None
    grad_bias = _fp32_zeros(problem, problem.n_vocab) if need_bias else None
    if deterministic:
        grad_weight = _fp32_zeros(problem, problem.n_vocab, problem.n_hidden) if need_weight else None
        if need_hidden or need_weight or need_bias:
            deterministic_backward(problem, stats, coef, grad_hidden, grad_weight, grad_bias)
    elif need_weight:
        grad_weight = _chunked_weight_backward(problem, stats, coef, grad_hidden, grad_bias)
    else:
        grad_weight = None
        if need_hidden or need_bias:
            _launch(problem, stats, coef, grad_hidden, None, grad_bias, 0, problem.n_vocab)
    return _cast(grad_hidden, problem.hidden), _cast(grad_weight, problem.weight), _cast(grad_bias, problem.bias)


def _fp32_zeros(problem: HeadProblem, *shape: int) -> torch.Tensor:
    return torch.zeros(shape, dtype=torch.float32, device=problem.hidden.device)


def _cast(grad: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
    return grad.to(like.dtype) if grad is not None else None


def _chunked_weight_backward(problem, stats, coef, grad_hidden, grad_bias) -> torch.Tensor:
    """Run the atomic kernel chunk by chunk (see ``weight_chunk_rows``); the weight gradient."""
    n_vocab, n_hidden = problem.n_vocab, problem.n_hidden
    rows = weight_chunk_rows(problem)
    accum = _fp32_zeros(problem, rows, n_hidden)
    if problem.weight.dtype == torch.float32:  # one chunk, and the fp32 sum is the gradient
        _launch(problem, stats, coef, grad_hidden, accum, grad_bias, 0, n_vocab)
        return accum
    grad_weight = torch.empty((n_vocab, n_hidden), dtype=problem.weight.dtype, device=problem.hidden.device)
    for v_start in range(0, n_vocab, rows):
        v_stop = min(v_start + rows, n_vocab)
        if v_start:
            accum.zero_()
        _launch(problem, stats, coef, grad_hidden, accum, grad_bias, v_start, v_stop)
        grad_weight[v_start:v_stop].copy_(accum[: v_stop - v_start])
    return grad_weight


def _launch(problem, stats, coef, grad_hidden, grad_weight, grad_bias, v_start: int, v_stop: int) -> None:
    """One launch of ``_lce_backward_kernel`` over the vocabulary columns [v_start, v_stop)."""
    config = problem.config
    placeholder = coef  # any fp32 tensor; never dereferenced when its flag is off
    grid = (triton.cdiv(problem.n_tokens, config.block_n) * triton.cdiv(v_stop - v_start, config.block_v),)
    _lce_backward_kernel[grid](
        *problem.inputs(),
        stats,
        coef,
        *(grad if grad is not None else placeholder for grad in (grad_hidden, grad_weight, grad_bias)),
        problem.n_tokens,
        v_start,
        v_stop,
        problem.n_hidden,
        *problem.layout(),
        **problem.constants(
            GRAD_HIDDEN=grad_hidden is not None,
            GRAD_WEIGHT=grad_weight is not None,
            GRAD_BIAS=grad_bias is not None,
            GROUP_N=config.group_n,
            **problem.backward_terms(),
        ),
        **problem.launch_options(),
    )
