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

import torch
import triton
import triton.language as tl

from .problem import HeadProblem
from .tiles import dlogit_tile, logit_tile, mma, to_compute, token_block, vocab_block


@triton.jit
def add_product(
    out_rows,
    out_mask,
    a,
    b_rows,
    stride_bh,
    b_mask,
    n_hidden,
    COMPUTE_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
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
        acc = mma(a, to_compute(b, COMPUTE_DTYPE, DOT_UPCAST), acc, DOT_PRECISION, DOT_UPCAST)
        tl.store(out_rows + ks[None, :], acc, mask=out_tile)


@triton.jit
def _grad_hidden_kernel(
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
    n_vocab,
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
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid_n = tl.program_id(0)
    n_active = tl.load(n_active_ptr)
    if pid_n * BLOCK_N >= n_active:  # a block past the active tokens has nothing to do
        return
    tok, row_mask = token_block(order_ptr, n_active, pid_n, BLOCK_N)
    gh_rows = grad_hidden_ptr + tok[:, None] * n_hidden  # contiguous fp32 (N, H)
    for v0 in range(0, n_vocab, BLOCK_V):
        cols, col_mask = vocab_block(v0, n_vocab, BLOCK_V)
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
        dz = to_compute(dz, COMPUTE_DTYPE, DOT_UPCAST)
        add_product(
            gh_rows,
            row_mask,
            dz,
            weight_ptr + cols[:, None] * stride_wv,
            stride_wh,
            col_mask,
            n_hidden,
            COMPUTE_DTYPE,
            DOT_PRECISION,
            DOT_UPCAST,
            BLOCK_H,
        )
        tl.debug_barrier()  # this pass's stores land before the next pass reloads the rows


@triton.jit
def _grad_weight_kernel(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    class_weight_ptr,
    targets_ptr,
    order_ptr,
    n_active_ptr,
    stats_ptr,
    coef_ptr,
    grad_weight_ptr,
    grad_bias_ptr,
    n_vocab,
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
    GRAD_WEIGHT: tl.constexpr,
    GRAD_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid_v = tl.program_id(0)
    n_active = tl.load(n_active_ptr)
    cols, col_mask = vocab_block(pid_v * BLOCK_V, n_vocab, BLOCK_V)
    gw_rows = grad_weight_ptr + cols[:, None] * n_hidden  # contiguous fp32 (V, H)
    grad_bias = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for n0 in range(0, n_active, BLOCK_N):
        tok, row_mask = token_block(order_ptr, n_active, n0 // BLOCK_N, BLOCK_N)
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
            grad_bias += tl.sum(dz, axis=0)
        if GRAD_WEIGHT:
            add_product(
                gw_rows,
                col_mask,
                tl.trans(to_compute(dz, COMPUTE_DTYPE, DOT_UPCAST)),
                hidden_ptr + tok[:, None] * stride_hn,
                stride_hh,
                row_mask,
                n_hidden,
                COMPUTE_DTYPE,
                DOT_PRECISION,
                DOT_UPCAST,
                BLOCK_H,
            )
            tl.debug_barrier()  # as in _grad_hidden_kernel
    if GRAD_BIAS:
        tl.store(grad_bias_ptr + cols, grad_bias, mask=col_mask)


def deterministic_backward(
    problem: HeadProblem,
    stats: torch.Tensor,
    coef: torch.Tensor,
    grad_hidden: torch.Tensor | None,
    grad_weight: torch.Tensor | None,
    grad_bias: torch.Tensor | None,
) -> None:
    """Fill the zeroed fp32 buffers that are not None; same contract as ``lce_backward``."""
    sizes = (problem.n_vocab, problem.n_hidden, *problem.layout())
    if grad_hidden is not None:
        _grad_hidden_kernel[(triton.cdiv(problem.n_tokens, problem.config.block_n),)](
            *problem.inputs(),
            stats,
            coef,
            grad_hidden,
            *sizes,
            **problem.constants(**problem.backward_terms()),
            **problem.launch_options(),
        )
    if grad_weight is not None or grad_bias is not None:
        placeholder = coef  # any fp32 tensor; never dereferenced when its flag is off
        _grad_weight_kernel[(triton.cdiv(problem.n_vocab, problem.config.block_v),)](
            *problem.inputs(),
            stats,
            coef,
            grad_weight if grad_weight is not None else placeholder,
            grad_bias if grad_bias is not None else placeholder,
            *sizes,
            **problem.constants(
                GRAD_WEIGHT=grad_weight is not None, GRAD_BIAS=grad_bias is not None, **problem.backward_terms()
            ),
            **problem.launch_options(),
        )
