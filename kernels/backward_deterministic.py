"""Deterministic backward: every gradient row has one owner that sums in a fixed order.

The default backward (``backward_fused.py``) lets many programs add into the same gradient rows
with fp32 atomics, whose order, and so whose rounding, changes from run to run.  Here
each output row is written by exactly one program:

- ``_grad_hidden_kernel``: one program per block of ``BLOCK_N`` active tokens walks the
  whole vocabulary ``BLOCK_V`` columns at a time and accumulates ``dlogits @ W`` into its
  own ``grad_hidden`` rows;
- ``_grad_weight_kernel``: one program per ``BLOCK_V`` vocabulary rows walks the active
  tokens ``BLOCK_N`` at a time and accumulates ``dlogits.T @ hidden`` (and the bias
  gradient) into its own rows.

The accumulators are too wide (H floats per row) to live in registers, so they live in
the fp32 output buffers: a program reads its rows, adds one product and writes them back,
``BLOCK_H`` features at a time.  Nothing else touches those rows, and a barrier after each
pass orders one pass's writes before the next pass's reads, so the summation order is
fixed and the result bitwise reproducible on the same device and configuration.  The
price is one extra logit recompute when both gradients are needed (each kernel
recomputes its logit tiles).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .problem import Grads, HeadProblem, Upstream
from .tiles import dlogit_tile, logit_tile, mma, to_compute, token_block, vocab_block


@triton.jit
def add_product(out_rows, out_mask, a, b_rows, stride_bh, b_mask, n_hidden, DOT: tl.constexpr, BLOCK_H: tl.constexpr):
    """``out[rows, :H] += a @ b[rows, :H]``, ``BLOCK_H`` features at a time, read-modify-write.

    ``out_rows`` are row pointers into a contiguous fp32 (rows, H) buffer owned by this
    program (``out_mask`` its valid rows); ``b_rows`` row pointers of the right operand,
    read through ``stride_bh`` (``b_mask`` its valid rows).
    """
    for k0 in range(0, n_hidden, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_mask = ks < n_hidden
        b = tl.load(b_rows + ks[None, :] * stride_bh, mask=b_mask[:, None] & k_mask[None, :], other=0.0)
        out_tile = out_mask[:, None] & k_mask[None, :]
        acc = tl.load(out_rows + ks[None, :], mask=out_tile, other=0.0)
        acc = mma(a, to_compute(b, DOT), acc, DOT)
        tl.store(out_rows + ks[None, :], acc, mask=out_tile)


@triton.jit
def _grad_hidden_kernel(
    head,  # problem.Head: the logits' inputs
    labels,  # problem.Labels: targets, class weights, the active tokens
    upstream,  # problem.Upstream: the forward's (lse, nll) and the per-token coefficients
    grad_hidden_ptr,  # out: contiguous fp32 (N, H), zeroed
    DOT: tl.constexpr,  # problem.Dot: how the matmuls run
    COEF_WIDTH: tl.constexpr,  # coefficients per token (tiles.dlogit_tile)
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid_n = tl.program_id(0)
    n_active = tl.load(labels.n_active)
    if pid_n * BLOCK_N >= n_active:  # a block past the active tokens has nothing to do
        return
    tok, row_mask = token_block(labels.order, n_active, pid_n, BLOCK_N)
    gh_rows = grad_hidden_ptr + tok[:, None] * head.n_hidden
    for v0 in range(0, head.n_vocab, BLOCK_V):
        cols, col_mask = vocab_block(v0, head.n_vocab, BLOCK_V)
        z = logit_tile(head, tok, cols, row_mask, col_mask, DOT, BLOCK_H)
        dz = dlogit_tile(z, tok, cols, row_mask, col_mask, head, labels, upstream, COEF_WIDTH)
        dz = to_compute(dz, DOT)
        w_rows = head.weight + cols[:, None] * head.stride_wv
        add_product(gh_rows, row_mask, dz, w_rows, head.stride_wh, col_mask, head.n_hidden, DOT, BLOCK_H)
        tl.debug_barrier()  # this pass's stores land before the next pass reloads the rows


@triton.jit
def _grad_weight_kernel(
    head,  # problem.Head: the logits' inputs
    labels,  # problem.Labels: targets, class weights, the active tokens
    upstream,  # problem.Upstream: the forward's (lse, nll) and the per-token coefficients
    grads,  # problem.Grads: contiguous fp32 weight (V, H, zeroed) and bias (V,) buffers, or None
    DOT: tl.constexpr,  # problem.Dot: how the matmuls run
    COEF_WIDTH: tl.constexpr,  # coefficients per token (tiles.dlogit_tile)
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid_v = tl.program_id(0)
    n_active = tl.load(labels.n_active)
    cols, col_mask = vocab_block(pid_v * BLOCK_V, head.n_vocab, BLOCK_V)
    if grads.weight is not None:
        gw_rows = grads.weight + cols[:, None] * head.n_hidden
    grad_bias = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for n0 in range(0, n_active, BLOCK_N):
        tok, row_mask = token_block(labels.order, n_active, n0 // BLOCK_N, BLOCK_N)
        z = logit_tile(head, tok, cols, row_mask, col_mask, DOT, BLOCK_H)
        dz = dlogit_tile(z, tok, cols, row_mask, col_mask, head, labels, upstream, COEF_WIDTH)
        if grads.bias is not None:
            grad_bias += tl.sum(dz, axis=0)
        if grads.weight is not None:
            dz_t = tl.trans(to_compute(dz, DOT))
            h_rows = head.hidden + tok[:, None] * head.stride_hn
            add_product(gw_rows, col_mask, dz_t, h_rows, head.stride_hh, row_mask, head.n_hidden, DOT, BLOCK_H)
            tl.debug_barrier()  # as in _grad_hidden_kernel
    if grads.bias is not None:
        tl.store(grads.bias + cols, grad_bias, mask=col_mask)


def deterministic_backward(problem: HeadProblem, upstream: Upstream, grads: Grads) -> None:
    """Fill the zeroed fp32 buffers of ``grads`` that are not None; same contract as
    ``backward_fused.lce_backward``."""
    constants = dict(DOT=problem.dot(), COEF_WIDTH=problem.coef_width, **problem.blocks())
    if grads.hidden is not None:
        _grad_hidden_kernel[(triton.cdiv(problem.n_tokens, problem.config.block_n),)](
            problem.head(), problem.labels(), upstream, grads.hidden, **constants, **problem.launch_options()
        )
    if grads.weight is not None or grads.bias is not None:
        _grad_weight_kernel[(triton.cdiv(problem.n_vocab, problem.config.block_v),)](
            problem.head(),
            problem.labels(),
            upstream,
            grads._replace(hidden=None),
            **constants,
            **problem.launch_options(),
        )
