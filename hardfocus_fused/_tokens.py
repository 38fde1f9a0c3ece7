"""Token bookkeeping shared by both implementations (all O(tokens), no logits)."""

from __future__ import annotations

import torch


def shift_targets(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Targets for next-token prediction: position t is scored against ``labels[..., t + 1]``.

    The last position of each sequence gets ``ignore_index``.  Only the (small) integer
    labels are shifted; hidden states are used in place.
    """
    pad = torch.full_like(labels[..., :1], ignore_index)
    return torch.cat([labels[..., 1:], pad], dim=-1)


def partition_active(active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(order, n_active)``: a permutation (int32) listing active tokens first, and their
    count as a 1-element int32 tensor on the same device (no host synchronisation)."""
    order = torch.argsort((~active).to(torch.int8), stable=True).to(torch.int32)
    n_active = active.sum(dtype=torch.int32).reshape(1)
    return order, n_active


def compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """dtype the Triton matmuls run in: the common dtype, or for mixed inputs (bf16 hidden
    with an fp32 head under autocast, say) the lower-precision one, as autocast would."""
    if hidden.dtype == weight.dtype:
        return hidden.dtype
    return min((hidden.dtype, weight.dtype), key=lambda d: torch.finfo(d).bits)
