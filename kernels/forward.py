"""Forward kernel: per-token log-sum-exp and target logit, never storing logits.

Each program owns ``BLOCK_N`` tokens and one contiguous slice ("split") of the
vocabulary.  It walks its slice ``BLOCK_V`` columns at a time, keeps a running max and
running sum of exponentials (online log-sum-exp), and picks out the target logit when the
target column passes by.  Splitting the vocabulary gives small token counts enough
programs to fill the GPU; the per-split results are merged by ``lse_forward`` with one
O(tokens x splits) log-sum-exp.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import KernelConfig, interpreter_active
from .tiles import logit_tile, token_block, vocab_block
from .types import layout_args, tile_constants


@triton.jit
def _lse_forward_kernel(
    hidden_ptr, weight_ptr, bias_ptr, targets_ptr, order_ptr, n_active_ptr,
    lse_part_ptr, target_logit_ptr,
    n_vocab, n_hidden, tiles_per_split, n_splits,
    stride_hn, stride_hh, stride_wv, stride_wh, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    n_active = tl.load(n_active_ptr)
    if pid_n * BLOCK_N >= n_active:  # a block past the active tokens has nothing to do
        return
    tok, row_mask = token_block(order_ptr, n_active, pid_n, BLOCK_N)
    target = tl.load(targets_ptr + tok, mask=row_mask, other=-1)

    v_begin = split * tiles_per_split * BLOCK_V
    v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_V, n_vocab)
    run_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    target_logit = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols, col_mask = vocab_block(v0, v_end, BLOCK_V)
        z = logit_tile(
            hidden_ptr, weight_ptr, bias_ptr, tok, cols, row_mask, col_mask,
            n_hidden, stride_hn, stride_hh, stride_wv, stride_wh, softcap,
            HAS_BIAS, HAS_SOFTCAP, COMPUTE_DTYPE, DOT_PRECISION, DOT_UPCAST, BLOCK_N, BLOCK_V, BLOCK_H,
        )
        z = tl.where(col_mask[None, :], z, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
        run_max = new_max
        is_target = cols[None, :] == target[:, None]
        target_logit += tl.sum(tl.where(is_target, z, 0.0), axis=1)

    tl.store(lse_part_ptr + tok * n_splits + split, run_max + tl.log(run_sum), mask=row_mask)
    # Exactly one split holds each target column, so exactly one program writes it.
    owns_target = (target >= v_begin) & (target < v_end)
    tl.store(target_logit_ptr + tok, target_logit, mask=row_mask & owns_target)


def _num_splits(n_tokens: int, n_tiles: int, config: KernelConfig, device: torch.device) -> int:
    """Vocabulary splits so that about two waves of programs cover the GPU."""
    if config.vocab_splits:
        return max(1, min(config.vocab_splits, n_tiles))
    if interpreter_active() or device.type != "cuda":
        return 1
    n_row_blocks = triton.cdiv(max(n_tokens, 1), config.block_n)
    sm_count = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_tiles, triton.cdiv(2 * sm_count, n_row_blocks)))


MAX_GRID_Y = 65535  # CUDA's limit on the second grid dimension


def lse_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    order: torch.Tensor,
    n_active: torch.Tensor,
    softcap: float | None,
    compute_dtype: torch.dtype,
    config: KernelConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``(lse, target_logit)`` in fp32 for the tokens listed in ``order[:n_active]``.

    ``hidden`` is (N, H), ``weight`` (V, H), ``targets`` (N,) int64, ``order`` (N,) int32 a
    permutation of the tokens with the ``n_active`` (a 1-element int32 device tensor)
    tokens that have a target first.  Entries of inactive tokens are 0.
    """
    n_tokens, n_hidden = hidden.shape
    n_vocab = weight.shape[0]
    n_tiles = triton.cdiv(n_vocab, config.block_v)
    n_splits = min(_num_splits(n_tokens, n_tiles, config, hidden.device), MAX_GRID_Y)
    tiles_per_split = triton.cdiv(n_tiles, n_splits)
    n_splits = triton.cdiv(n_tiles, tiles_per_split)  # no split may be empty

    lse_part = torch.zeros((n_tokens, n_splits), dtype=torch.float32, device=hidden.device)
    target_logit = torch.zeros(n_tokens, dtype=torch.float32, device=hidden.device)
    grid = (triton.cdiv(n_tokens, config.block_n), n_splits)
    _lse_forward_kernel[grid](
        hidden, weight, bias if bias is not None else hidden, targets, order, n_active,
        lse_part, target_logit,
        n_vocab, n_hidden, tiles_per_split, n_splits,
        *layout_args(hidden, weight, softcap),
        **tile_constants(bias is not None, softcap is not None, compute_dtype, config),
        **config.launch_options(),
    )
    lse = lse_part[:, 0] if n_splits == 1 else torch.logsumexp(lse_part, dim=1)
    return lse, target_logit
