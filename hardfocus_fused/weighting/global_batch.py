"""Weights over the global batch of a data-parallel group: only B floats per rank move.

Each rank holds its own sequences.  ``global_weights`` all-gathers the detached
per-sequence losses and token counts (ranks may hold different numbers of sequences),
computes the weights of the whole group's batch with the same rule as a single process
would, and hands each rank the slice for its own sequences.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..collectives import gather_ints
from .methods import with_sample_weights


def _all_gather_varlen(values: torch.Tensor, group) -> list[torch.Tensor]:
    """Every rank's 1-D ``values`` (lengths may differ), in rank order."""
    lengths = [n for (n,) in gather_ints((values.numel(),), group, values.device)]
    padded = torch.zeros(max(lengths), dtype=values.dtype, device=values.device)
    padded[: values.numel()] = values
    pieces = [torch.zeros_like(padded) for _ in lengths]
    dist.all_gather(pieces, padded, group=group)
    return [piece[:n] for piece, n in zip(pieces, lengths)]


def global_weights(
    seq_loss: torch.Tensor, counts: torch.Tensor, group, weigh, sample_weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, int]:
    """``(this rank's weights, world size)``: ``weigh(all_losses, all_counts)`` over the
    group's concatenated batch (rank order), times the gathered ``sample_weight`` and
    renormalised when given, sliced to this rank's sequences.  ``counts`` are token counts
    or (fractional) token masses; their dtype is kept."""
    losses = _all_gather_varlen(seq_loss.detach().float(), group)
    gathered = _all_gather_varlen(counts if counts.is_floating_point() else counts.to(torch.int64), group)
    rank = dist.get_rank(group)
    start = sum(piece.numel() for piece in losses[:rank])
    weights = weigh(torch.cat(losses), torch.cat(gathered))
    if sample_weight is not None:
        weights = with_sample_weights(weights, torch.cat(_all_gather_varlen(sample_weight.float(), group)))
    return weights[start : start + seq_loss.numel()], dist.get_world_size(group)
