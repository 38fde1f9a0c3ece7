"""The per-token loss on a head sharded over the vocabulary (tensor parallelism).

Each rank of the group holds a contiguous block of the head's rows and runs the same kernels
on it, with every target outside its block turned into a column it scores against nothing.
Only O(tokens) numbers cross the ranks:

- forward: each rank's per-token log-sum-exp over its block (one all-gather, with the
  block's entropy and largest logit when asked for), from which every rank forms the whole
  vocabulary's log-sum-exp (entropy, argmax), and the target's negative log-probability
  from the rank that holds the target (one all-reduce);
- backward: each rank forms ``dloss/dlogits`` of its block from the whole log-sum-exp, so
  its weight (and bias) gradient is its block's, and the partial hidden-state gradients
  are summed over the group (one all-reduce of tokens x H).

No rank holds the whole weight or a (tokens x V) tensor.  Precision: the target's NLL is
``nll_r + log1p(sum_{r' != r} exp(lse_{r'} - lse_r))`` on the rank ``r`` holding it, where
``nll_r`` is the kernels' own NLL over that rank's block (kept to its relative precision
for a confident prediction, see ``kernels/forward.py``) and the ``log1p`` term is small
when that block holds the probability mass.

The backward goes through the same paths as one rank's, with per-token coefficients that
say what each rank's block holds: on the rank holding a token's target, ``g (p - onehot)
+ g_lse p``; elsewhere ``(g + g_lse) p`` (the target column's coefficient is 0, so the
placeholder target never enters).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..collectives import gather_ints
from ..options import HeadSharding

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # a torch built without distributed support: no DTensor to meet
    DTensor = Replicate = Shard = None
from . import torch_path, triton_path
from .loss_terms import PLAIN


@dataclass(frozen=True)
class VocabShard:
    """This rank's block of a sharded head: rows ``start .. start + size - 1`` of a
    vocabulary of ``total``, over ``group``."""

    group: Any
    start: int
    size: int
    total: int


def local_head(
    weight: torch.Tensor, bias: torch.Tensor | None, sharding: HeadSharding
) -> tuple[torch.Tensor, torch.Tensor | None, VocabShard | None]:
    """``(weight, bias, shard)``: the head as this rank holds it, and its block of the
    vocabulary (None: the head is whole).  A ``DTensor`` weight sharded on dimension 0 of a
    1-D mesh gives its local rows (autograd returns their gradient as a ``DTensor``); a
    replicated one its full local copy; a plain weight with ``sharding.vocab_group`` is this
    rank's block starting at ``sharding.vocab_start``.  The blocks are checked to tile the
    vocabulary (one all-gather of two integers)."""
    if DTensor is not None and isinstance(weight, DTensor):
        if sharding.vocab_group is not None:
            raise ValueError("vocab_group is for a plain (local) weight shard; a DTensor weight carries its own mesh")
        mesh, placements = weight.device_mesh, weight.placements
        if mesh.ndim != 1:
            raise ValueError(f"weight: a DTensor on a {mesh.ndim}-D mesh is not supported; shard the head on 1-D")
        if isinstance(placements[0], Replicate):
            return weight.to_local(), _local_bias(bias, sharded=False), None
        if not isinstance(placements[0], Shard) or placements[0].dim != 0:
            raise ValueError(
                f"weight is a DTensor placed {placements[0]}: the fused loss needs it sharded over the vocabulary, "
                "Shard(0) (ColwiseParallel on the head), not over the hidden dimension"
            )
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(weight.shape, mesh, placements)
        shard = VocabShard(mesh.get_group(), int(offset[0]), int(shape[0]), int(weight.shape[0]))
        return weight.to_local(), _local_bias(bias, sharded=True), shard
    if sharding.vocab_group is None:
        return weight, bias, None
    group, start, size = sharding.vocab_group, sharding.vocab_start, weight.shape[0]
    ranges = sorted((first, first + rows) for first, rows in gather_ints((start, size), group, weight.device))
    expected = 0
    for first, stop in ranges:
        if first != expected:
            raise ValueError(
                f"vocab_start: the ranks' vocabulary blocks {ranges} must tile [0, V) without gap or overlap "
                f"(a block starts at {first}, where {expected} was expected)"
            )
        expected = stop
    return weight, bias, VocabShard(group, start, size, expected)


def _local_bias(bias, sharded: bool) -> torch.Tensor | None:
    """The bias of a ``DTensor`` head as this rank holds it: placed like the weight."""
    if isinstance(bias, DTensor):
        if isinstance(bias.placements[0], Shard) != sharded:
            raise ValueError(f"bias is placed {bias.placements[0]}, unlike the weight")
        return bias.to_local()
    if bias is not None and sharded:
        raise TypeError("bias must be a DTensor sharded like the weight")
    return bias


def sharded_token_terms(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    ignore_index: int,
    softcap: float | None,
    shard: VocabShard,
    impl: str,
    deterministic: bool,
    backward_impl: str,
    autocast: torch.dtype | None,
    lse_square_scale: float = 0.0,
    argmax: bool = False,
    entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per-token ``(loss, lse, argmax, entropy)`` (N,) over the whole vocabulary for 2-D
    ``hidden``, this rank's block ``weight`` (and ``bias``) and global 1-D ``targets``;
    ``impl`` is ``"triton"`` or ``"torch"``.  The loss, log-sum-exp and entropy are
    differentiable and 0 where not scored; the argmax is the global id of the first
    largest logit (-1 where not scored); each of the last two None unless asked for.  A
    z-loss (``lse_square_scale``) is added from the whole log-sum-exp."""
    _check_same_tokens(targets, shard.group)
    loss, lse, ent, best = _ShardedTerms.apply(
        hidden,
        weight,
        bias,
        targets,
        ignore_index,
        softcap,
        shard,
        (impl, deterministic, backward_impl, autocast, argmax, entropy),
    )
    if lse_square_scale:
        loss = loss + lse_square_scale * lse * lse
    return loss, lse, best if argmax else None, ent if entropy else None


class _ShardedTerms(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index, softcap, shard, how):
        impl, deterministic, strategy, cast, argmax, entropy = how
        ctx.set_materialize_grads(False)  # an output no loss uses brings None, not zeros
        valid = targets != ignore_index
        local = targets - shard.start
        owner = valid & (local >= 0) & (local < shard.size)
        # Elsewhere a placeholder column (0) keeps the token scored; its coefficient is 0.
        local_targets = torch.where(owner, local, torch.where(valid, 0, ignore_index))
        if impl == "triton":
            _, _, best, ent, stats = triton_path.forward(
                hidden, weight, bias, local_targets, ignore_index, softcap, None, cast, PLAIN, argmax, entropy
            )
        else:
            _, _, best, ent, stats = torch_path.forward(
                hidden, weight, bias, local_targets, ignore_index, softcap, PLAIN, argmax, entropy
            )
        block_lse, block_nll = stats[:, 0], stats[:, 1]
        # One all-gather of each rank's per-token block values: log-sum-exp, and the
        # block's entropy and largest logit (with its global id) when asked for.
        rows = [block_lse]
        if entropy:
            rows.append(ent.to(block_lse.dtype))
        if argmax:
            rows += [
                _logit_at(hidden, weight, bias, best, softcap).to(block_lse.dtype),
                (best + shard.start).to(block_lse.dtype),
            ]
        every = _all_gather_rows(torch.stack(rows), shard.group)  # (ranks, rows, N)
        lse, to_whole = _whole_lse(every[:, 0], dist.get_rank(shard.group))
        # This rank's NLL of its target column against the whole vocabulary; summed over the
        # group where it holds the target: the target's NLL.
        view_nll = block_nll + to_whole
        nll = torch.where(owner, view_nll, 0.0)
        dist.all_reduce(nll, group=shard.group)
        zero = torch.zeros((), dtype=lse.dtype, device=lse.device)
        whole_ent = _whole_entropy(every[:, 0], every[:, 1], lse) if entropy else zero.expand(0)
        whole_best = _whole_argmax(every[:, -2], every[:, -1]) if argmax else targets.new_empty(0)
        ctx.save_for_backward(hidden, weight, bias, local_targets, owner, torch.stack([lse, view_nll], dim=1))
        ctx.whole_entropy = whole_ent if entropy else None
        ctx.options = (ignore_index, softcap, impl, deterministic, strategy, cast, shard.group)
        ctx.mark_non_differentiable(whole_best)
        return (
            torch.where(valid, nll, zero),
            torch.where(valid, lse, zero),
            torch.where(valid, whole_ent, zero) if entropy else whole_ent,
            torch.where(valid, whole_best, -1) if argmax else whole_best,
        )

    @staticmethod
    def backward(ctx, grad_loss, grad_lse, grad_entropy, _grad_argmax):
        hidden, weight, bias, local_targets, owner, residual = ctx.saved_tensors
        ignore_index, softcap, impl, deterministic, strategy, cast, group = ctx.options
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        if not any(needs):
            return (None,) * 8
        g = grad_loss if grad_loss is not None else torch.zeros_like(residual[:, 0])
        g_lse = grad_lse if grad_lse is not None else torch.zeros_like(g)
        # The paths' plain coefficients are (a, e) = (grad_loss, grad_lse): a (p - onehot) + e p.
        a = torch.where(owner, g, 0.0)
        e = g_lse + torch.where(owner, 0.0, g)
        common = (a, e, hidden, weight, bias, local_targets, residual, ignore_index, softcap, PLAIN, needs)
        entropy_grad = {} if grad_entropy is None else dict(grad_entropy=grad_entropy, entropy=ctx.whole_entropy)
        if impl == "triton":
            grads = triton_path.backward(
                *common, deterministic=deterministic, strategy=strategy, config=None, autocast=cast, **entropy_grad
            )
        else:
            grads = torch_path.backward(*common, **entropy_grad)
        grad_hidden, grad_weight, grad_bias = grads
        if grad_hidden is not None:  # each rank's block's share, summed in fp32 at least
            total = grad_hidden.to(torch.promote_types(grad_hidden.dtype, torch.float32))
            dist.all_reduce(total, group=group)
            grad_hidden = total.to(grad_hidden.dtype)
        return grad_hidden, grad_weight, grad_bias, *(None,) * 5


def _check_same_tokens(targets: torch.Tensor, group) -> None:
    """Every rank of a sharded head scores the same tokens: one all-gather of the count,
    so that ranks holding different batches get this error rather than a collective's."""
    counts = [count for (count,) in gather_ints((targets.numel(),), group, targets.device)]
    if len(set(counts)) > 1:
        raise ValueError(
            f"targets: the ranks of a head sharded over the vocabulary hold different tokens (counts {counts}); "
            "every rank must score the same tokens against its block"
        )


def _all_gather_rows(rows: torch.Tensor, group) -> torch.Tensor:
    """Every rank's ``rows`` (k, N), stacked in group-rank order: (ranks, k, N)."""
    pieces = [torch.empty_like(rows) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, rows.contiguous(), group=group)
    return torch.stack(pieces)


def _whole_lse(every: torch.Tensor, mine: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lse, lse - every[mine])``: the whole vocabulary's log-sum-exp from every rank's
    block log-sum-exp (ranks, N), and this block's distance to it, formed as ``log1p`` of the
    other blocks' share where this block holds the largest log-sum-exp (where a confident
    prediction's small NLL needs it)."""
    top, best = every.max(dim=0)
    others = torch.exp(every - top)
    others.scatter_(0, best[None], 0.0)  # the top block's own 1, left out
    log_total = torch.log1p(others.sum(dim=0))
    lse = top + log_total
    return lse, torch.where(best == mine, log_total, lse - every[mine])


def _whole_entropy(block_lse: torch.Tensor, block_entropy: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """The softmax's entropy over the whole vocabulary from the blocks' (ranks, N): with each
    block's probability mass ``P_r = exp(lse_r - lse)``, ``H = sum_r P_r (H_r + lse - lse_r)``,
    every term >= 0 (no cancellation for a confident prediction's small entropy)."""
    gap = lse - block_lse
    return (torch.exp(-gap) * (block_entropy + gap)).sum(dim=0)


def _whole_argmax(block_max: torch.Tensor, block_id: torch.Tensor) -> torch.Tensor:
    """The global id of the first largest logit from each block's largest logit and its
    global id (ranks, N): the smallest id among the blocks that hold the maximum."""
    top = block_max.max(dim=0).values
    ids = torch.where(block_max == top, block_id, torch.inf)
    return ids.min(dim=0).values.to(torch.int64)


def _logit_at(hidden, weight, bias, columns, softcap) -> torch.Tensor:
    """Each token's logit at its block column ``columns`` (N,) (any column where it is -1),
    in fp32 at least: one row of the weight per token (tokens x H), not a logit tile."""
    acc = torch.promote_types(hidden.dtype, torch.float32)
    index = columns.clamp_min(0)
    z = (hidden.to(acc) * weight[index].to(acc)).sum(dim=1)
    if bias is not None:
        z = z + bias[index].to(acc)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z
