"""Building blocks shared by the forward and backward kernels.

Masks, explained once: a tile covers ``BLOCK_N`` token slots x ``BLOCK_V`` vocabulary
columns x ``BLOCK_H`` hidden features.  ``row_mask`` is False for token slots past the
last active token, ``col_mask`` for columns past the vocabulary, ``k_mask`` for features
past the hidden size.  Masked loads read 0, so masked rows and columns contribute
nothing to a dot product; callers then exclude them from reductions and stores.
"""

import triton
import triton.language as tl
from triton.language.extra import libdevice

from .config import interpreter_active

# Kernels are specialised on this at import time (set TRITON_INTERPRET before importing).
INTERPRETED = tl.constexpr(interpreter_active())


@triton.jit
def tanh(x):
    """tanh to fp32 relative precision, near 0 too (where ``2 * sigmoid(2x) - 1`` cancels
    against 1, keeping only an absolute error of about ``ulp(1)``).  Compiled: libdevice's
    ``tanhf`` (2 ulp).  Triton's CPU interpreter has no libdevice: there, ``-m / (2 + m)``
    with ``m = expm1(-2|x|)`` and x's sign, which keeps the same relative precision."""
    if INTERPRETED:
        m = expm1(-2.0 * tl.abs(x))
        t = -m / (2.0 + m)
        return tl.where(x < 0, -t, t)
    else:
        return libdevice.tanh(x)


@triton.jit
def grouped_tile(pid, n_row_blocks, n_cols, GROUP_N: tl.constexpr):
    """``(row block, column)`` of program ``pid`` in grouped order (the Triton matmul
    tutorial's swizzle): programs walk ``GROUP_N`` token blocks down one column (a
    vocabulary tile or split) before the next column.  The ~one wave of co-resident
    programs then covers ``GROUP_N`` token blocks x a few columns, so each column's weight
    rows are shared by ``GROUP_N`` programs and each token block's hidden rows (and
    gradient rows) by the others, in L2, instead of every program of the wave sharing one
    column and sweeping all token blocks."""
    per_group = GROUP_N * n_cols
    first = (pid // per_group) * GROUP_N
    size = tl.minimum(n_row_blocks - first, GROUP_N)
    local = pid % per_group
    return first + local % size, local // size


@triton.jit
def token_block(order_ptr, n_active, pid_n, BLOCK_N: tl.constexpr):
    """int64 token indices of the ``pid_n``-th block of active tokens, and its row mask.

    Active tokens come first in ``order``; slots at or past ``n_active`` are masked.
    """
    slots = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = slots < n_active
    tok = tl.load(order_ptr + slots, mask=row_mask, other=0).to(tl.int64)
    return tok, row_mask


@triton.jit
def vocab_block(v0, v_end, BLOCK_V: tl.constexpr):
    """int64 vocabulary columns ``v0 .. v0 + BLOCK_V - 1`` and their mask (``< v_end``)."""
    cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
    return cols, cols < v_end


@triton.jit
def to_compute(x, COMPUTE_DTYPE: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """``x`` as a matmul operand in ``COMPUTE_DTYPE``, rounded to nearest even as the GPU
    rounds.  Triton's CPU interpreter truncates fp32 to bfloat16 instead (a bias of half a
    bf16 ulp on average); under it (``DOT_UPCAST``) the fp32 bits are rounded first, so the
    truncating cast is exact.  Compiled kernels get the plain cast."""
    if DOT_UPCAST:
        if x.dtype == tl.float32:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
            x = bits.to(tl.float32, bitcast=True)
    return x.to(COMPUTE_DTYPE)


@triton.jit
def mma(a, b, acc, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation.

    ``DOT_UPCAST`` is set only under Triton's CPU interpreter, which multiplies bfloat16
    operands as their raw uint16 bits: upcasting to fp32 first is exact and yields the
    same products the tensor cores form.
    """
    if DOT_UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def logit_tile(
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
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """fp32 tile ``softcap(hidden[tok] @ weight[cols].T + bias[cols])``.

    ``tok`` and ``cols`` are int64 index vectors, so ``index * stride`` cannot overflow
    when tokens x H or V x H exceed 2**31.
    """
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    h_rows = hidden_ptr + tok[:, None] * stride_hn
    w_rows = weight_ptr + cols[:, None] * stride_wv
    for k0 in range(0, n_hidden, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_mask = ks < n_hidden
        h = tl.load(h_rows + ks[None, :] * stride_hh, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_rows + ks[None, :] * stride_wh, mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        acc = mma(
            to_compute(h, COMPUTE_DTYPE, DOT_UPCAST),
            tl.trans(to_compute(w, COMPUTE_DTYPE, DOT_UPCAST)),
            acc,
            DOT_PRECISION,
            DOT_UPCAST,
        )
    return finish_logits(acc, bias_ptr, cols, col_mask, softcap, HAS_BIAS, HAS_SOFTCAP)


@triton.jit
def finish_logits(acc, bias_ptr, cols, col_mask, softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """``softcap(acc + bias[cols])`` for an fp32 tile of ``hidden @ weight.T``."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        acc = softcap * tanh(acc / softcap)
    return acc


@triton.jit
def stored_logit_tile(
    logits_ptr,
    stride_zn,
    tok,
    cols,
    row_mask,
    col_mask,
    bias_ptr,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    """The tile :func:`logit_tile` would compute, from fp32 ``hidden @ weight.T`` already in
    memory (row ``tok``, column ``cols``; the bias and soft-cap are applied here)."""
    z = tl.load(
        logits_ptr + tok[:, None] * stride_zn + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0
    )
    return finish_logits(z, bias_ptr, cols, col_mask, softcap, HAS_BIAS, HAS_SOFTCAP)


@triton.jit
def expm1(x):
    """``exp(x) - 1`` to fp32 precision also near 0, where the subtraction would cancel:
    the Taylor series to ``x**13`` (Horner form) for ``|x| <= 1``, ``exp(x) - 1`` beyond."""
    series = tl.full(x.shape, 1.0, tl.float32)
    for i in tl.static_range(12):
        series = 1.0 + x * series / (13 - i)  # 1 + x/n * (...), n = 13 .. 2
    return tl.where(tl.abs(x) <= 1.0, x * series, tl.exp(x) - 1.0)


@triton.jit
def dlogit_tile(
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
    HAS_SOFTCAP: tl.constexpr,
    RICH_COEF: tl.constexpr,
    CLASS_WEIGHT: tl.constexpr,
    ENTROPY: tl.constexpr,
):
    """fp32 tile of ``dloss/dlogits``.

    Plain cross-entropy (``RICH_COEF`` off): ``coef * (softmax(z) - onehot(target))`` with
    one coefficient per token.  With ``RICH_COEF`` each token has three, ``(a, e, u)``
    (``coef`` is (N, 3)), for the terms label smoothing, z-loss and a differentiable
    log-sum-exp add (see ``hardfocus_fused.op.loss_terms``):

        a * (p - onehot) + e * p - u * c        (c: the class weights, or 1 per column)

    and with ``ENTROPY`` five, ``(a, e, u, k, mu)``, adding a differentiable entropy's
    ``k * p * (z - mu)`` (``k = -dL/dH``, ``mu = lse - H`` the mean logit under p: the
    entropy's gradient is ``-p (log p + H) = -p (z - mu)``).

    ``stats`` holds ``(lse, nll)`` per token (see ``forward.lse_forward``).  The target
    column's ``p_t - 1 = expm1(-nll)``: for a confident prediction (``p_t`` near 1),
    ``exp(z_t - lse) - 1`` would cancel and leave only the rounding of ``lse``, an
    absolute error of ``ulp(lse)`` on a value of size ``1 - p_t``.  ``z`` is the
    (softcapped) logit tile from :func:`logit_tile`; with a softcap the derivative of
    ``c * tanh(x / c)``, ``1 - (z / c)^2``, is applied.  Masked rows and columns are 0, so
    the tile can go straight into the gradient matmuls.
    """
    lse = tl.load(stats_ptr + 2 * tok, mask=row_mask, other=0.0)
    nll = tl.load(stats_ptr + 2 * tok + 1, mask=row_mask, other=0.0)
    target = tl.load(targets_ptr + tok, mask=row_mask, other=-1)
    prob = tl.exp(z - lse[:, None])
    is_target = cols[None, :] == target[:, None]
    if RICH_COEF:
        WIDTH: tl.constexpr = 3 + 2 * ENTROPY
        coef = tl.load(coef_ptr + WIDTH * tok, mask=row_mask, other=0.0)
        extra = tl.load(coef_ptr + WIDTH * tok + 1, mask=row_mask, other=0.0)
        uniform = tl.load(coef_ptr + WIDTH * tok + 2, mask=row_mask, other=0.0)
        # The target column is a per-row value (p_t = exp(-nll)): one tile stays live.
        at_target = coef * expm1(-nll) + extra * tl.exp(-nll)
        if ENTROPY:
            k = tl.load(coef_ptr + WIDTH * tok + 3, mask=row_mask, other=0.0)
            mu = tl.load(coef_ptr + WIDTH * tok + 4, mask=row_mask, other=0.0)
            # At the target column z - mu = (lse - nll) - mu: a per-row value too.
            at_target += k * tl.exp(-nll) * ((lse - mu) - nll)
            scale = (coef + extra)[:, None] + k[:, None] * (z - mu[:, None])
            dz = tl.where(is_target, at_target[:, None], prob * scale)
        else:
            dz = tl.where(is_target, at_target[:, None], prob * (coef + extra)[:, None])
        if CLASS_WEIGHT:
            c = tl.load(class_weight_ptr + cols, mask=col_mask, other=0.0)
            dz -= uniform[:, None] * c[None, :]
        else:
            dz -= uniform[:, None]
    else:
        coef = tl.load(coef_ptr + tok, mask=row_mask, other=0.0)
        dz = tl.where(is_target, expm1(-nll)[:, None], prob) * coef[:, None]
    if HAS_SOFTCAP:
        capped = z / softcap
        dz = dz * (1.0 - capped * capped)
    return tl.where(row_mask[:, None] & col_mask[None, :], dz, 0.0)
