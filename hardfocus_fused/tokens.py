"""Token bookkeeping shared by both implementations (all O(tokens), no logits)."""

from __future__ import annotations

import torch


def shift_targets(
    labels: torch.Tensor, ignore_index: int, starts: torch.Tensor | None = None, shift: int = 1
) -> torch.Tensor:
    """Targets for next-token prediction: position t is scored against ``labels[..., t + shift]``.

    The last ``shift`` positions of each sequence get ``ignore_index``, and so does every
    position whose target would lie in the next document when ``starts`` (bool, like
    ``labels``) marks where documents begin in a packed row: a document is never scored on
    another document's tokens.  ``shift=0`` returns ``labels``.  Only the (small) integer
    labels are shifted; hidden states are used in place.
    """
    if shift == 0:
        return labels
    length = labels.shape[-1]
    pad = torch.full_like(labels[..., : min(shift, length)], ignore_index)
    targets = torch.cat([labels[..., shift:], pad], dim=-1)
    if starts is not None and shift < length:
        # Document number of every position; a target is kept only inside its own document.
        doc = starts.long().cumsum(-1)
        crosses = torch.cat([doc[..., shift:] != doc[..., :-shift], torch.ones_like(starts[..., :shift])], dim=-1)
        targets = targets.masked_fill(crosses, ignore_index)
    return targets


def document_starts(position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Where documents begin in packed rows: every row start, and every position id 0 that
    follows a non-zero one (``DataCollatorWithFlattening``'s resets) with real tokens
    before it in its row.

    Padding never starts a document or makes one of its own; it joins the adjacent
    document, as the model's own loss treats it (a left pad's target is the row's first
    token):

    - padding is where ``attention_mask`` is 0; without a mask, a row's leading run of one
      repeated non-zero position id before its first 0 (``generate`` fills left padding
      with 1 and counts the text from 0);
    - a run of zeros starts one document, so left padding with position ids clamped to 0
      is not a string of one-token documents (and a one-token document, which has no
      target of its own, simply joins the next one).

    A row that begins inside a document (increasing position ids before its first 0) keeps
    that piece as a document of its own.
    """
    zero = position_ids == 0
    reset = zero.clone()
    reset[..., 1:] &= ~zero[..., :-1]
    content = attention_mask != 0 if attention_mask is not None else ~_leading_fill(position_ids, zero)
    content = content.long()
    content_before = (content.cumsum(-1) - content) > 0
    starts = reset & content.bool() & content_before
    starts[..., 0] = True
    return starts


def _leading_fill(position_ids: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Each row's leading run of one repeated non-zero position id, where it is all that
    comes before the row's first 0 (``generate``-style left padding); else nothing."""
    before_first_zero = zero.long().cumsum(-1) == 0
    run = ((position_ids == position_ids[..., :1]) & before_first_zero).long().cumprod(-1).bool()
    prefix = before_first_zero.sum(-1, keepdim=True)
    is_fill = (prefix > 0) & (prefix == run.sum(-1, keepdim=True)) & zero.any(-1, keepdim=True)
    return run & is_fill


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


def compute_dtype(hidden: torch.Tensor, weight: torch.Tensor, autocast: torch.dtype | None = None) -> torch.dtype:
    """dtype the Triton matmuls run in: the lowest precision among ``hidden``'s, the
    weight's and ``autocast`` (the autocast dtype when autocast is on), as autocast's
    ``lm_head`` would multiply (bf16 hidden with an fp32 head, or fp32 inputs under bf16
    autocast, run in bf16)."""
    dtypes = [hidden.dtype, weight.dtype] + ([autocast] if autocast is not None else [])
    return min(dtypes, key=lambda d: torch.finfo(d).bits)
