"""Token bookkeeping shared by both implementations (all O(tokens), no logits)."""

from __future__ import annotations

import torch


def shift_targets(labels: torch.Tensor, ignore_index: int, starts: torch.Tensor | None = None) -> torch.Tensor:
    """Targets for next-token prediction: position t is scored against ``labels[..., t + 1]``.

    The last position of each sequence gets ``ignore_index``, and so does the last position
    of each document when ``starts`` (bool, like ``labels``) marks where documents begin in a
    packed row: a document is never scored on the next document's first token.  Only the
    (small) integer labels are shifted; hidden states are used in place.
    """
    pad = torch.full_like(labels[..., :1], ignore_index)
    targets = torch.cat([labels[..., 1:], pad], dim=-1)
    if starts is not None:
        next_starts = torch.cat([starts[..., 1:], torch.ones_like(starts[..., :1])], dim=-1)
        targets = targets.masked_fill(next_starts, ignore_index)
    return targets


def document_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """Where documents begin in packed rows: every row start, and every position id 0 that
    follows a non-zero one (``DataCollatorWithFlattening``'s resets).

    A run of zeros starts one document: left padding with position ids clamped to 0 is not
    a string of one-token documents, and a one-token document (which has no target of its
    own) simply joins the next one.
    """
    zero = position_ids == 0
    starts = zero.clone()
    starts[..., 1:] &= ~zero[..., :-1]
    starts[..., 0] = True
    return starts


def segment_bounds(starts: torch.Tensor) -> torch.Tensor:
    """``[start_0, start_1, ..., N]`` for flat (N,) ``starts`` with ``starts[0]`` True.

    Sizing the result reads the segment count back to the host (one synchronisation).
    """
    end = torch.tensor([starts.numel()], device=starts.device)
    return torch.cat([starts.nonzero().squeeze(1), end])


def segment_sums(values: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """fp32 sums of flat ``values`` over the segments ``bounds[i] .. bounds[i + 1]``.

    Differences of an fp64 running sum: no atomics (deterministic), and differentiable.
    """
    running = torch.nn.functional.pad(values.double().cumsum(0), (1, 0))
    return (running[bounds[1:]] - running[bounds[:-1]]).float()


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
