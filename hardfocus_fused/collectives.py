"""Small integer all-gathers the distributed checks share."""

from __future__ import annotations

import torch
import torch.distributed as dist


def gather_ints(values: tuple[int, ...], group, device: torch.device) -> list[tuple[int, ...]]:
    """Every rank's ``values`` (the same count on each), in group-rank order: one all-gather
    of a few int64s (on ``device``, which the group's backend must reach)."""
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    pieces = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, mine, group=group)
    return [tuple(int(v) for v in piece.tolist()) for piece in pieces]
