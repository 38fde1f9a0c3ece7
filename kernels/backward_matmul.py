"""The ``"matmul"`` backward strategy: library matmuls (cuBLAS on a GPU) for the three
``N x H x V`` products, one small Triton kernel for the elementwise ``dlogits``.

The vocabulary is covered in chunks of ``cols`` columns whose fp32 logits take at most
the chunk budget (``HeadConfigs.matmul_chunk_bytes``); only the active tokens (non-zero
coefficient) enter, gathered once.  Per chunk:

    z  = h @ W[chunk].T                    (fp32 output: the recompute)
    dz = coef * (softmax(z) - onehot)      (_dlogits_kernel: bias, soft-cap, in the compute dtype;
                                            the bias gradient's column sums, fp32, one owner each)
    grad_W[chunk]  = dz.T @ h              (one product over all active tokens, no accumulator;
                                            in row blocks whose fp32 result fits the budget)
    grad_h        += dz @ W[chunk]         (fp32 accumulator over the chunks)

Every product accumulates in fp32 (``out_dtype=torch.float32`` on CUDA; on other devices
the operands are widened to fp32, which forms the same products exactly), the operands
are in the compute dtype, as in the fused kernels.  Cost over the fused strategy: the
chunk's logits make one round trip through memory (14 bytes per logit: about 9 ms, 14% of
the backward's matmul floor, at the Llama-3-8B head on an H100, by byte count; see
benchmarks/GPU_NOTES.md), the active hidden states are gathered, and the active-token
count is read to the host (one synchronisation).  Deterministic for a
fixed chunking as the library's matmuls are.
"""

from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl

from .problem import Grads, HeadProblem, Upstream
from .tiles import dlogit_tile, finish_logits, to_compute

# The elementwise kernel's tile: 64 rows x 32 columns per step over 4 warps; a program owns
# 32 columns, so a chunk of 8192 columns (16384 tokens at 512 MiB) has 256 programs.
DLOGITS_BLOCK_N, DLOGITS_BLOCK_V = 64, 32


@triton.jit
def _dlogits_kernel(
    head,  # problem.Head: its bias and soft-cap (the products are already in z)
    labels,  # problem.Labels: targets, class weights, the active tokens
    upstream,  # problem.Upstream: the forward's (lse, nll) and the per-token coefficients
    z_ptr,  # fp32 (n_rows, n_cols) hidden @ weight.T of the chunk, rows stride_z apart
    dz_ptr,  # out: (n_rows, n_cols) dloss/dlogits in the compute dtype, rows stride_dz apart
    grads,  # problem.Grads: only its bias is written, fp32 (V,) column sums of dz (None: not needed)
    n_rows,
    n_cols,
    v_start,
    stride_z,
    stride_dz,
    DOT: tl.constexpr,  # problem.Dot: the compute dtype dz is stored in
    COEF_WIDTH: tl.constexpr,  # coefficients per token (tiles.dlogit_tile)
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # One program owns BLOCK_V columns of the chunk and walks all its rows, so it sums its
    # columns' bias gradient alone, in a fixed order (no atomics: deterministic).  Row r of
    # the chunk is active token order[r]; column c is vocabulary entry v_start + c.
    local = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = local < n_cols
    cols = (v_start + local).to(tl.int64)
    grad_bias = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for r0 in range(0, n_rows, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        row_mask = rows < n_rows
        tok = tl.load(labels.order + rows, mask=row_mask, other=0).to(tl.int64)
        rows = rows.to(tl.int64)
        mask = row_mask[:, None] & col_mask[None, :]
        z = tl.load(z_ptr + rows[:, None] * stride_z + local[None, :], mask=mask, other=0.0)
        z = finish_logits(z, head, cols, col_mask)
        dz = dlogit_tile(z, tok, cols, row_mask, col_mask, head, labels, upstream, COEF_WIDTH)
        if grads.bias is not None:
            grad_bias += tl.sum(dz, axis=0)
        tl.store(dz_ptr + rows[:, None] * stride_dz + local[None, :], to_compute(dz, DOT), mask=mask)
    if grads.bias is not None:
        tl.store(grads.bias + cols, grad_bias, mask=col_mask)


def matmul_backward(
    problem: HeadProblem,
    stats: torch.Tensor,
    coef: torch.Tensor,
    chunk_bytes: int,
    need_hidden: bool = True,
    need_weight: bool = True,
    need_bias: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Same contract as ``backward.lce_backward``; the products by library matmuls."""
    hidden, weight, bias = problem.hidden, problem.weight, problem.bias
    need_bias = need_bias and bias is not None
    device, dtype = hidden.device, problem.compute_dtype
    n_active = int(problem.n_active.item())  # sizes the gather: one host synchronisation
    grad_hidden = torch.zeros_like(hidden) if need_hidden else None
    grad_weight = torch.zeros_like(weight) if need_weight else None
    grad_bias = torch.zeros(problem.n_vocab, dtype=torch.float32, device=device) if need_bias else None
    if n_active == 0 or not (need_hidden or need_weight or need_bias):
        return grad_hidden, grad_weight, grad_bias.to(bias.dtype) if need_bias else None

    active = problem.order[:n_active].long()  # all tokens, in order, when all are active
    h = (hidden if n_active == problem.n_tokens else hidden[active]).to(dtype)
    w = weight.to(dtype)
    block_v = problem.config.block_v
    cols = max(block_v, min(problem.n_vocab, chunk_bytes // (4 * n_active)) // block_v * block_v)
    weight_rows = max(block_v, chunk_bytes // (4 * problem.n_hidden) // block_v * block_v)
    z = torch.empty((n_active, cols), dtype=torch.float32, device=device)
    dz = z if dtype == torch.float32 else torch.empty((n_active, cols), dtype=dtype, device=device)
    grad_h = torch.zeros((n_active, problem.n_hidden), dtype=torch.float32, device=device) if need_hidden else None
    for v_start in range(0, problem.n_vocab, cols):
        v_stop = min(v_start + cols, problem.n_vocab)
        z_c, dz_c, w_c = z[:, : v_stop - v_start], dz[:, : v_stop - v_start], w[v_start:v_stop]
        _mm(h, w_c.T, out=z_c)
        dlogits(problem, z_c, dz_c, stats, coef, v_start, grad_bias if need_bias else None)
        if need_weight:  # in row blocks whose fp32 product fits the budget too
            for r0 in range(0, v_stop - v_start, weight_rows):
                r1 = min(r0 + weight_rows, v_stop - v_start)
                rows = grad_weight[v_start + r0 : v_start + r1]
                if rows.dtype == torch.float32:
                    _mm(dz_c[:, r0:r1].T, h, out=rows)
                else:
                    rows.copy_(_mm(dz_c[:, r0:r1].T, h))
        if need_hidden:
            _mm(dz_c, w_c, out=grad_h, accumulate=True)
    if need_hidden:
        grad_hidden[active] = grad_h.to(hidden.dtype)
    return grad_hidden, grad_weight, grad_bias.to(bias.dtype) if need_bias else None


def dlogits(
    problem: HeadProblem,
    z: torch.Tensor,
    dz: torch.Tensor,
    stats: torch.Tensor,
    coef: torch.Tensor,
    v_start: int,
    grad_bias: torch.Tensor | None,
) -> None:
    """``dz = dloss/dlogits`` (in the compute dtype) from fp32 ``z = hidden @ weight.T``
    (without bias or soft-cap) over the columns ``v_start ..`` of ``z``'s width: row ``r``
    is token ``problem.order[r]``.  With ``grad_bias`` (fp32, (V,)) the columns' sums of
    ``dz`` are stored into it (not added)."""
    _dlogits_kernel[(triton.cdiv(z.shape[1], DLOGITS_BLOCK_V),)](
        problem.head(),
        problem.labels(),
        Upstream(stats, coef),
        z,
        dz,
        Grads(None, None, grad_bias),
        z.shape[0],
        z.shape[1],
        v_start,
        z.stride(0),
        dz.stride(0),
        DOT=problem.dot(),
        COEF_WIDTH=problem.coef_width,
        BLOCK_N=DLOGITS_BLOCK_N,
        BLOCK_V=DLOGITS_BLOCK_V,
        num_warps=4,
    )


_WIDENED = {"count": 0}


def _wants_out_dtype(a: torch.Tensor) -> bool:
    """Whether ``a``'s device should run the half-precision products with an fp32 result
    directly (CUDA); elsewhere widened copies are the ordinary path."""
    return a.is_cuda


def _warn_widened_once(error: Exception) -> None:
    """One warning per process: on a GPU, widened copies make the ``"matmul"`` backward's
    products run as fp32 matmuls (several times slower than half precision, and more memory)."""
    if _WIDENED.get("warned"):
        return
    _WIDENED["warned"] = True
    warnings.warn(
        f"backward_impl='matmul': this torch ({torch.__version__}) has no half-precision matmul with an "
        f"fp32 result on this GPU ({type(error).__name__}: {str(error).splitlines()[0]:.120}); its products "
        f"run on widened fp32 copies, several times slower. Use backward_impl='fused' (the default) or a "
        f"torch with mm(..., out_dtype=torch.float32)",
        RuntimeWarning,
        stacklevel=3,
    )


def widened_matmuls() -> int:
    """How many half-precision matmuls ran on widened fp32 copies (on CUDA: 0 when the
    installed torch has ``out_dtype`` matmuls)."""
    return _WIDENED["count"]


def _mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None, accumulate: bool = False) -> torch.Tensor:
    """``a @ b`` (``out + a @ b`` with ``accumulate``) with fp32 accumulation and an fp32
    result, whatever the operands' dtype: on CUDA through ``out_dtype=torch.float32``; else
    (or where this torch lacks it) on fp32 copies of the operands, whose products are
    exactly those of the half-precision values."""
    if a.dtype != torch.float32 and _wants_out_dtype(a):
        try:
            if accumulate:
                return torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
            if out is not None:
                return torch.mm(a, b, out_dtype=torch.float32, out=out)
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError, NotImplementedError) as error:
            _warn_widened_once(error)
    if a.dtype != torch.float32:
        _WIDENED["count"] += 1
    a, b = a.float(), b.float()
    if accumulate:
        return out.addmm_(a, b)
    return torch.mm(a, b, out=out) if out is not None else torch.mm(a, b)
