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
from .problem import Grads, HeadProblem, Upstream
from .tiles import dlogit_tile, grouped_tile, logit_tile, mma, to_compute, token_block, vocab_block


@triton.jit
def _lce_backward_kernel(
    head,  # problem.Head: the logits' inputs
    labels,  # problem.Labels: targets, class weights, the active tokens
    upstream,  # problem.Upstream: the forward's (lse, nll) and the per-token coefficients
    grads,  # problem.Grads: fp32 buffers to add into; None where a gradient is not needed
    v_start,
    v_stop,
    DOT: tl.constexpr,  # problem.Dot: how the matmuls run
    COEF_WIDTH: tl.constexpr,  # coefficients per token (tiles.dlogit_tile)
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    GROUP_N: tl.constexpr,
):
    # One launch covers the vocabulary columns [v_start, v_stop); grads.weight points at
    # the fp32 accumulator of exactly those rows.  A 1-D grid (no 65535 cap on the
    # vocabulary tiles) in grouped order (tiles.grouped_tile): a wave of programs covers
    # GROUP_N token blocks x a few vocabulary tiles, so GROUP_N programs at a time add into
    # one grad_weight tile and the grad_hidden rows being added to stay few, in L2.
    n_tiles = tl.cdiv(v_stop - v_start, BLOCK_V)
    pid_n, pid_v = grouped_tile(tl.program_id(0), tl.cdiv(head.n_tokens, BLOCK_N), n_tiles, GROUP_N)
    n_active = tl.load(labels.n_active)
    if pid_n * BLOCK_N >= n_active:  # a block past the active tokens has nothing to do
        return
    tok, row_mask = token_block(labels.order, n_active, pid_n, BLOCK_N)
    cols, col_mask = vocab_block(v_start + pid_v * BLOCK_V, v_stop, BLOCK_V)

    z = logit_tile(head, tok, cols, row_mask, col_mask, DOT, BLOCK_H)
    dz = dlogit_tile(z, tok, cols, row_mask, col_mask, head, labels, upstream, COEF_WIDTH)

    if grads.bias is not None:
        tl.atomic_add(grads.bias + cols, tl.sum(dz, axis=0), mask=col_mask, sem="relaxed")
    dz_c = to_compute(dz, DOT)
    # Gradient buffers are contiguous fp32: (N, H) and (v_stop - v_start, H).
    n_hidden = head.n_hidden
    if grads.hidden is not None:
        gh_rows = grads.hidden + tok[:, None] * n_hidden
    if grads.weight is not None:
        gw_rows = grads.weight + (cols - v_start)[:, None] * n_hidden
    h_rows = head.hidden + tok[:, None] * head.stride_hn
    w_rows = head.weight + cols[:, None] * head.stride_wv
    for k0 in range(0, n_hidden, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_mask = ks < n_hidden
        if grads.hidden is not None:
            w = tl.load(w_rows + ks[None, :] * head.stride_wh, mask=col_mask[:, None] & k_mask[None, :], other=0.0)
            gh = mma(dz_c, to_compute(w, DOT), None, DOT)
            tl.atomic_add(gh_rows + ks[None, :], gh, mask=row_mask[:, None] & k_mask[None, :], sem="relaxed")
        if grads.weight is not None:
            h = tl.load(h_rows + ks[None, :] * head.stride_hh, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            gw = mma(tl.trans(dz_c), to_compute(h, DOT), None, DOT)
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
    upstream = Upstream(stats, coef)
    grad_hidden = _fp32_zeros(problem, problem.n_tokens, problem.n_hidden) if need_hidden else None
    grad_bias = _fp32_zeros(problem, problem.n_vocab) if need_bias else None
    if deterministic:
        grad_weight = _fp32_zeros(problem, problem.n_vocab, problem.n_hidden) if need_weight else None
        if need_hidden or need_weight or need_bias:
            deterministic_backward(problem, upstream, Grads(grad_hidden, grad_weight, grad_bias))
    elif need_weight:
        grad_weight = _chunked_weight_backward(problem, upstream, grad_hidden, grad_bias)
    else:
        grad_weight = None
        if need_hidden or need_bias:
            _launch(problem, upstream, Grads(grad_hidden, None, grad_bias), 0, problem.n_vocab)
    return _cast(grad_hidden, problem.hidden), _cast(grad_weight, problem.weight), _cast(grad_bias, problem.bias)


def _fp32_zeros(problem: HeadProblem, *shape: int) -> torch.Tensor:
    return torch.zeros(shape, dtype=torch.float32, device=problem.hidden.device)


def _cast(grad: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
    return grad.to(like.dtype) if grad is not None else None


def _chunked_weight_backward(problem, upstream, grad_hidden, grad_bias) -> torch.Tensor:
    """Run the atomic kernel chunk by chunk (see ``weight_chunk_rows``); the weight gradient."""
    n_vocab, n_hidden = problem.n_vocab, problem.n_hidden
    rows = weight_chunk_rows(problem)
    accum = _fp32_zeros(problem, rows, n_hidden)
    if problem.weight.dtype == torch.float32:  # one chunk, and the fp32 sum is the gradient
        _launch(problem, upstream, Grads(grad_hidden, accum, grad_bias), 0, n_vocab)
        return accum
    grad_weight = torch.empty((n_vocab, n_hidden), dtype=problem.weight.dtype, device=problem.hidden.device)
    for v_start in range(0, n_vocab, rows):
        v_stop = min(v_start + rows, n_vocab)
        if v_start:
            accum.zero_()
        _launch(problem, upstream, Grads(grad_hidden, accum, grad_bias), v_start, v_stop)
        grad_weight[v_start:v_stop].copy_(accum[: v_stop - v_start])
    return grad_weight


def _launch(problem, upstream: Upstream, grads: Grads, v_start: int, v_stop: int) -> None:
    """One launch of ``_lce_backward_kernel`` over the vocabulary columns [v_start, v_stop)."""
    config = problem.config
    grid = (triton.cdiv(problem.n_tokens, config.block_n) * triton.cdiv(v_stop - v_start, config.block_v),)
    _lce_backward_kernel[grid](
        problem.head(),
        problem.labels(),
        upstream,
        grads,
        v_start,
        v_stop,
        DOT=problem.dot(),
        COEF_WIDTH=problem.coef_width,
        GROUP_N=config.group_n,
        **problem.blocks(),
        **problem.launch_options(),
    )
