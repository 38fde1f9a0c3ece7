"""Forward kernel: per-token log-sum-exp and target logit, never storing logits.

Each program owns ``BLOCK_N`` tokens and one contiguous slice ("split") of the
vocabulary.  It walks its slice ``BLOCK_V`` columns at a time, keeps a running max and
running sum of exponentials (online log-sum-exp), and picks out the target logit when the
target column passes by.  Splitting the vocabulary gives small token counts enough
programs to fill the GPU; ``lse_forward`` merges the per-split (max, sum) pairs, an
O(tokens x splits) step.

The NLL is formed as ``(max - z_target) + log1p(rest)``, where ``rest`` is the sum of
``exp(z - max)`` over all columns but one at the max, not as ``lse - z_target``: for a
confident prediction both ``lse`` and ``z_target`` are large and nearly equal, and their
difference would keep only the rounding of ``lse`` (``ulp(lse)``, about 2e-6 at 30), and
``log(1 + rest)`` only the rounding of ``1 + rest``; the former keeps a small NLL to its
own relative precision.  The backward's
target column ``p_t - 1 = expm1(-nll)`` depends on exactly that.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .config import device_l2_bytes, device_sm_count, split_plan
from .problem import HeadProblem, Stored
from .tiles import grouped_tile, logit_tile, stored_logit_tile, token_block, vocab_block


@triton.jit
def _lse_forward_kernel(
    head,  # problem.Head: the logits' inputs
    labels,  # problem.Labels: targets, class weights, the active tokens
    stored,  # problem.Stored fp32 products to read instead of multiplying, or None
    part_ptr,  # out: (n_tokens, n_splits, PART) fp32 per-split partial sums, see the end
    target_logit_ptr,  # out: (n_tokens,) fp32, the target's logit
    tiles_per_split,
    n_splits,
    DOT: tl.constexpr,  # problem.Dot: how the matmuls run
    SMOOTH: tl.constexpr,  # also sum c_v * z_v per token (label smoothing)
    ARGMAX: tl.constexpr,  # also find each token's first largest logit
    ENTROPY: tl.constexpr,  # also sum the entropy's gap terms
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    GROUP_N: tl.constexpr,
):
    # A 1-D grid of (token block, split) pairs in grouped order (see tiles.grouped_tile).
    pid_n, split = grouped_tile(tl.program_id(0), tl.cdiv(head.n_tokens, BLOCK_N), n_splits, GROUP_N)
    n_active = tl.load(labels.n_active)
    if pid_n * BLOCK_N >= n_active:  # a block past the active tokens has nothing to do
        return
    tok, row_mask = token_block(labels.order, n_active, pid_n, BLOCK_N)
    target = tl.load(labels.targets + tok, mask=row_mask, other=-1)

    v_begin = split * tiles_per_split * BLOCK_V
    v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_V, head.n_vocab)
    # run_rest: sum of exp(z - run_max) over the columns seen, leaving out one column at
    # the max (its term is exactly 1): for a confident prediction the rest is small, and
    # adding the 1 would round it to the precision of 1.
    run_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    run_rest = tl.zeros((BLOCK_N,), dtype=tl.float32)
    target_logit = tl.zeros((BLOCK_N,), dtype=tl.float32)
    run_smooth = tl.zeros((BLOCK_N,), dtype=tl.float32)  # SMOOTH: sum of c_v * z_v (c: class weights or 1)
    run_arg = tl.zeros((BLOCK_N,), dtype=tl.int32)  # ARGMAX: column of the first maximum
    # ENTROPY: sum of exp(z - run_max) * (run_max - z), every term >= 0 (no cancellation for
    # a confident prediction); the entropy is this over the sum of exp(z - max), plus
    # log(that sum) (see merge_entropy).
    run_gap = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols, col_mask = vocab_block(v0, v_end, BLOCK_V)
        if stored is None:
            z = logit_tile(head, tok, cols, row_mask, col_mask, DOT, BLOCK_H)
        else:
            z = stored_logit_tile(stored, head, tok, cols, row_mask, col_mask)
        if SMOOTH:
            if labels.class_weight is not None:
                c = tl.load(labels.class_weight + cols, mask=col_mask, other=0.0)  # 0 past the vocabulary
                run_smooth += tl.sum(z * c[None, :], axis=1)
            else:
                run_smooth += tl.sum(tl.where(col_mask[None, :], z, 0.0), axis=1)
        z = tl.where(col_mask[None, :], z, float("-inf"))
        if ARGMAX:  # strictly greater: the first maximum over the columns walked in order
            tile_max, tile_arg = tl.max(z, axis=1, return_indices=True, return_indices_tie_break_left=True)
        else:
            tile_max = tl.max(z, axis=1)
        new_max = tl.maximum(run_max, tile_max)
        moved = new_max > run_max  # this tile holds the new max: its 1 is left out
        if ARGMAX:
            run_arg = tl.where(moved, (v0 + tile_arg).to(tl.int32), run_arg)
        if ENTROPY:
            # gap = new_max - z >= 0: 0 at the max, +inf at masked columns (z = -inf), where
            # exp(-gap) is 0; capped so that those add 0 to the entropy's sum, not 0 * inf.
            gap = tl.minimum(new_max[:, None] - z, 3.0e38)
            at_max = gap == 0.0
            expd = tl.exp(-gap)
        else:
            at_max = z == new_max[:, None]
            expd = tl.exp(z - new_max[:, None])
        tile_rest = tl.sum(tl.where(at_max, 0.0, expd), axis=1)
        tile_rest += tl.sum(at_max.to(tl.float32), axis=1) - moved.to(tl.float32)
        if ENTROPY:
            # Moving the reference from run_max to new_max adds the shift to every gap and
            # scales every exponential by exp(-shift); before the first tile there is
            # nothing to carry (run_gap = 0: shift 0 keeps it so, without inf * 0).
            shift = tl.where(run_max == float("-inf"), 0.0, new_max - run_max)
            run_gap = tl.exp(-shift) * (run_gap + shift * (run_rest + 1.0)) + tl.sum(expd * gap, axis=1)
        run_rest = tl.where(moved, (run_rest + 1.0) * tl.exp(run_max - new_max), run_rest) + tile_rest
        run_max = new_max
        is_target = cols[None, :] == target[:, None]
        target_logit += tl.sum(tl.where(is_target, z, 0.0), axis=1)

    # Per split: (max, rest), then the smoothing sum, the argmax (as fp32, exact below
    # 2**24 columns) and the entropy's gap sum when asked for.
    PART: tl.constexpr = 2 + SMOOTH + ARGMAX + ENTROPY
    part = part_ptr + (tok * n_splits + split) * PART
    tl.store(part, run_max, mask=row_mask)
    tl.store(part + 1, run_rest, mask=row_mask)
    if SMOOTH:
        tl.store(part + 2, run_smooth, mask=row_mask)
    if ARGMAX:
        tl.store(part + 2 + SMOOTH, run_arg.to(tl.float32), mask=row_mask)
    if ENTROPY:
        tl.store(part + 2 + SMOOTH + ARGMAX, run_gap, mask=row_mask)
    # Exactly one split holds each target column, so exactly one program writes it.
    owns_target = (target >= v_begin) & (target < v_end)
    tl.store(target_logit_ptr + tok, target_logit, mask=row_mask & owns_target)


@dataclass
class ForwardStats:
    """What the forward computes per token: ``stats`` (N, 2) fp32 ``(lse, nll)``, and when
    the problem asks for them ``smooth`` (N,) fp32, the sum over columns of ``c_v * z_v``
    (``c`` the class weights, or 1), ``argmax`` (N,) int64, the first column of the
    largest logit, and ``entropy`` (N,) fp32, the entropy of the softmax.  Inactive tokens
    get 0 (``entropy``: any value)."""

    stats: torch.Tensor
    smooth: torch.Tensor | None = None
    argmax: torch.Tensor | None = None
    entropy: torch.Tensor | None = None


def lse_forward(problem: HeadProblem, logits: torch.Tensor | None = None) -> ForwardStats:
    """Per-token statistics of the active tokens of ``problem`` (see ``ForwardStats``, and
    the module docstring for how ``nll`` keeps its precision).  Unless the config fixes
    it, the vocabulary split fills whole waves of the device's multiprocessors and keeps
    the hidden rows one wave re-reads within L2 (``config.split_plan``).

    ``logits``: (n_tokens, V) fp32 ``hidden @ weight.T`` already computed (without bias
    or soft-cap, unit column stride), read instead of recomputed."""
    config = problem.config
    n_tiles = triton.cdiv(problem.n_vocab, config.block_v)
    n_row_blocks = triton.cdiv(problem.n_tokens, config.block_n)
    device = problem.hidden.device
    hidden_block = config.block_n * problem.n_hidden * problem.compute_dtype.itemsize
    n_splits, tiles_per_split = split_plan(
        n_row_blocks, n_tiles, config, device_sm_count(device), hidden_block, device_l2_bytes(device)
    )
    width = 2 + problem.smooth + problem.argmax + problem.entropy
    part = torch.zeros((problem.n_tokens, n_splits, width), dtype=torch.float32, device=device)
    target_logit = torch.zeros(problem.n_tokens, dtype=torch.float32, device=device)
    if logits is not None and (
        logits.shape != (problem.n_tokens, problem.n_vocab) or logits.stride(1) != 1 or logits.dtype != torch.float32
    ):
        raise ValueError(f"logits must be ({problem.n_tokens}, {problem.n_vocab}) fp32 with unit column stride")
    _lse_forward_kernel[(n_row_blocks * n_splits,)](
        problem.head(),
        problem.labels(),
        Stored(logits, logits.stride(0)) if logits is not None else None,
        part,
        target_logit,
        tiles_per_split,
        n_splits,
        DOT=problem.dot(),
        SMOOTH=problem.smooth,
        ARGMAX=problem.argmax,
        ENTROPY=problem.entropy,
        GROUP_N=config.group_n,
        **problem.blocks(),
        **problem.launch_options(),
    )
    out = ForwardStats(merge_splits(part[..., 0], part[..., 1], target_logit))
    if problem.smooth:
        out.smooth = part[..., 2].sum(dim=1)
    if problem.argmax:
        best = part[..., 0].argmax(dim=1, keepdim=True)  # the first split holding the maximum
        out.argmax = part[..., 2 + problem.smooth].gather(1, best).squeeze(1).long()
    if problem.entropy:
        out.entropy = merge_entropy(part[..., 0], part[..., 1], part[..., 2 + problem.smooth + problem.argmax])
    return out


def merge_splits(part_max: torch.Tensor, part_rest: torch.Tensor, target_logit: torch.Tensor) -> torch.Tensor:
    """(N, 2) ``(lse, nll)`` from the splits' maxima and rests (N, splits): ``lse = max +
    log1p(rest)`` where ``rest`` sums ``exp(z - max)`` over every column but one at the max.
    Rows without a target (all 0) get 0."""
    row_max, best = part_max.max(dim=1)
    # Every split but the best brings its max's 1 back, scaled; the best one's stays out.
    terms = (part_rest + 1.0) * torch.exp(part_max - row_max[:, None])
    terms.scatter_(1, best[:, None], part_rest.gather(1, best[:, None]))
    log_total = torch.log1p(terms.sum(dim=1))
    return torch.stack([row_max + log_total, (row_max - target_logit) + log_total], dim=1)


def merge_entropy(part_max: torch.Tensor, part_rest: torch.Tensor, part_gap: torch.Tensor) -> torch.Tensor:
    """(N,) entropy of the softmax from the splits' maxima, rests and gap sums (N, splits).

    With ``m`` the row's max, ``T = sum_v exp(z_v - m)`` and ``G = sum_v exp(z_v - m) (m - z_v)``
    (every term >= 0), the entropy is ``-sum p log p = G / T + log T``: no large terms
    cancel, so a confident prediction keeps its small entropy to fp32 relative precision.
    A split's sums, taken about its own max ``m_s``, move to ``m`` as ``G = exp(m_s - m)
    (G_s + (m - m_s) T_s)``, ``T = exp(m_s - m) T_s``."""
    row_max, best = part_max.max(dim=1, keepdim=True)
    scale = torch.exp(part_max - row_max)
    split_total = part_rest + 1.0  # T_s: the rest plus the split max's own 1
    gap = (scale * (part_gap + (row_max - part_max) * split_total)).sum(dim=1)
    # T - 1 without adding the 1 (log1p keeps a confident prediction's small log T).
    rest = scale * split_total
    rest.scatter_(1, best, part_rest.gather(1, best))
    rest = rest.sum(dim=1)
    return gap / (1.0 + rest) + torch.log1p(rest)
