"""Building blocks shared by the forward and backward kernels.

Masks, explained once: a tile covers ``BLOCK_N`` token slots x ``BLOCK_V`` vocabulary
columns x ``BLOCK_H`` hidden features.  ``row_mask`` is False for token slots past the
last active token, ``col_mask`` for columns past the vocabulary, ``k_mask`` for features
past the hidden size.  Masked loads read 0, so masked rows and columns contribute
nothing to a dot product; callers then exclude them from reductions and stores.

The kernels' inputs arrive as the named tuples of ``kernels.problem`` (``head``,
``labels``, ``upstream``, ``grads``, the ``DOT`` constant); an optional input (a bias, a
soft-cap, class weights, a gradient not asked for) is None there, and ``if x is not None``
is decided when the kernel is compiled, so each variant holds only the code it uses.
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
def to_compute(x, DOT: tl.constexpr):
    """``x`` as a matmul operand in ``DOT.dtype``, rounded to nearest even as the GPU
    rounds.  Triton's CPU interpreter truncates fp32 to bfloat16 instead (a bias of half a
    bf16 ulp on average); under it (``DOT.upcast``) the fp32 bits are rounded first, so the
    truncating cast is exact.  Compiled kernels get the plain cast."""
    if DOT.upcast:
        if x.dtype == tl.float32:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
            x = bits.to(tl.float32, bitcast=True)
    return x.to(DOT.dtype)


@triton.jit
def mma(a, b, acc, DOT: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation (``acc`` None: ``a @ b``).

    ``DOT.upcast`` is set only under Triton's CPU interpreter, which multiplies bfloat16
    operands as their raw uint16 bits: upcasting to fp32 first is exact and yields the
    same products the tensor cores form.
    """
    if DOT.upcast:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc, input_precision=DOT.precision)


@triton.jit
def logit_tile(head, tok, cols, row_mask, col_mask, DOT: tl.constexpr, BLOCK_H: tl.constexpr):
    """fp32 tile ``softcap(hidden[tok] @ weight[cols].T + bias[cols])`` of the ``Head``
    (``kernels.problem``), one row per entry of ``tok``, one column per entry of ``cols``,
    the hidden dimension reduced ``BLOCK_H`` at a time.

    ``tok`` and ``cols`` are int64 index vectors, so ``index * stride`` cannot overflow
    when tokens x H or V x H exceed 2**31.
    """
    acc = tl.zeros((tok.shape[0], cols.shape[0]), dtype=tl.float32)
    h_rows = head.hidden + tok[:, None] * head.stride_hn
    w_rows = head.weight + cols[:, None] * head.stride_wv
    for k0 in range(0, head.n_hidden, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_mask = ks < head.n_hidden
        h = tl.load(h_rows + ks[None, :] * head.stride_hh, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_rows + ks[None, :] * head.stride_wh, mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        acc = mma(to_compute(h, DOT), tl.trans(to_compute(w, DOT)), acc, DOT)
    return finish_logits(acc, head, cols, col_mask)


@triton.jit
def finish_logits(acc, head, cols, col_mask):
    """``softcap(acc + bias[cols])`` for an fp32 tile of ``hidden @ weight.T``: the ``Head``'s
    bias and soft-cap, each only where it has one."""
    if head.bias is not None:
        acc += tl.load(head.bias + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if head.softcap is not None:
        acc = head.softcap * tanh(acc / head.softcap)
    return acc


@triton.jit
def stored_logit_tile(stored, head, tok, cols, row_mask, col_mask):
    """The tile :func:`logit_tile` would compute, read from the ``Stored`` fp32 products
    (row ``tok``, column ``cols``; the ``Head``'s bias and soft-cap are applied here)."""
    z = tl.load(
        stored.logits + tok[:, None] * stored.stride + cols[None, :],
        mask=row_mask[:, None] & col_mask[None, :],
        other=0.0,
    )
    return finish_logits(z, head, cols, col_mask)


@triton.jit
def expm1(x):
    """``exp(x) - 1`` to fp32 precision also near 0, where the subtraction would cancel:
    the Taylor series to ``x**13`` (Horner form) for ``|x| <= 1``, ``exp(x) - 1`` beyond."""
    series = tl.full(x.shape, 1.0, tl.float32)
    for i in tl.static_range(12):
        series = 1.0 + x * series / (13 - i)  # 1 + x/n * (...), n = 13 .. 2
    return tl.where(tl.abs(x) <= 1.0, x * series, tl.exp(x) - 1.0)


@triton.jit
def dlogit_tile(z, tok, cols, row_mask, col_mask, head, labels, upstream, COEF_WIDTH: tl.constexpr):
    """fp32 tile of ``dloss/dlogits`` at the logit tile ``z`` (rows ``tok``, columns ``cols``).

    ``COEF_WIDTH`` is the number of ``upstream.coef`` values per token.  1, plain
    cross-entropy: ``coef * (softmax(z) - onehot(target))``.  3, ``(a, e, u)``, for the terms
    label smoothing, z-loss and a differentiable log-sum-exp add (see
    ``hardfocus_fused.op.loss_terms``):

        a * (p - onehot) + e * p - u * c        (c: the class weights, or 1 per column)

    5, ``(a, e, u, k, mu)``, adding a differentiable entropy's ``k * p * (z - mu)``
    (``k = -dL/dH``, ``mu = lse - H`` the mean logit under p: the entropy's gradient is
    ``-p (log p + H) = -p (z - mu)``).

    ``upstream.stats`` holds ``(lse, nll)`` per token (see ``forward.lse_forward``).  The
    target column's ``p_t - 1 = expm1(-nll)``: for a confident prediction (``p_t`` near 1),
    ``exp(z_t - lse) - 1`` would cancel and leave only the rounding of ``lse``, an
    absolute error of ``ulp(lse)`` on a value of size ``1 - p_t``.  ``z`` is the
    (softcapped) logit tile from :func:`logit_tile`; with the ``Head``'s softcap ``c`` the
    derivative of ``c * tanh(x / c)``, ``1 - (z / c)^2``, is applied.  Masked rows and
    columns are 0, so the tile can go straight into the gradient matmuls.
    """
    lse = tl.load(upstream.stats + 2 * tok, mask=row_mask, other=0.0)
    nll = tl.load(upstream.stats + 2 * tok + 1, mask=row_mask, other=0.0)
    target = tl.load(labels.targets + tok, mask=row_mask, other=-1)
    prob = tl.exp(z - lse[:, None])
    is_target = cols[None, :] == target[:, None]
    if COEF_WIDTH > 1:
        coef_rows = upstream.coef + COEF_WIDTH * tok
        coef = tl.load(coef_rows, mask=row_mask, other=0.0)
        extra = tl.load(coef_rows + 1, mask=row_mask, other=0.0)
        uniform = tl.load(coef_rows + 2, mask=row_mask, other=0.0)
        # The target column is a per-row value (p_t = exp(-nll)): one tile stays live.
        at_target = coef * expm1(-nll) + extra * tl.exp(-nll)
        if COEF_WIDTH == 5:
            k = tl.load(coef_rows + 3, mask=row_mask, other=0.0)
            mu = tl.load(coef_rows + 4, mask=row_mask, other=0.0)
            # At the target column z - mu = (lse - nll) - mu: a per-row value too.
            at_target += k * tl.exp(-nll) * ((lse - mu) - nll)
            scale = (coef + extra)[:, None] + k[:, None] * (z - mu[:, None])
            dz = tl.where(is_target, at_target[:, None], prob * scale)
        else:
            dz = tl.where(is_target, at_target[:, None], prob * (coef + extra)[:, None])
        if labels.class_weight is not None:
            c = tl.load(labels.class_weight + cols, mask=col_mask, other=0.0)
            dz -= uniform[:, None] * c[None, :]
        else:
            dz -= uniform[:, None]
    else:
        coef = tl.load(upstream.coef + tok, mask=row_mask, other=0.0)
        dz = tl.where(is_target, expm1(-nll)[:, None], prob) * coef[:, None]
    if head.softcap is not None:
        capped = z / head.softcap
        dz = dz * (1.0 - capped * capped)
    return tl.where(row_mask[:, None] & col_mask[None, :], dz, 0.0)
