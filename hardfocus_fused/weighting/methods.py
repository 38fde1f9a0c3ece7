"""Sequence weights of the paper's methods, computed from detached per-sequence losses.

All functions take ``seq_loss`` (B,) and ``n_tokens`` (B,) and return fp32 weights (B,)
that sum to 1 over the sequences that have at least one target token ("live" ones);
sequences without a target get weight 0 and take part in no softmax or ranking.  The
weights are constants: the caller multiplies them with the differentiable losses.
"""

from __future__ import annotations

import torch

METHODS = ("irdro", "midranking", "highranking", "lowranking", "uniform", "mean")
SEQ_REDUCTIONS = ("mean", "sum")


def irdro_weights(seq_loss: torch.Tensor, live: torch.Tensor, r: float) -> torch.Tensor:
    """IR-DRO (paper eq. 3): ``softmax(L / r)`` over live sequences."""
    scores = torch.where(live, seq_loss.float() / r, float("-inf"))
    top = scores.max()
    # With no live sequence, ``scores - top`` is NaN everywhere; ``where`` turns it into 0.
    expd = torch.where(live, torch.exp(scores - top), 0.0)
    return expd / expd.sum().clamp_min(torch.finfo(torch.float32).tiny)


def ranking_window(n_live: int | torch.Tensor, method: str, n1: float, n2: float):
    """``(start, stop)`` ranks kept by a ranking method, ranks counted from the largest loss.

    MidRanking skips the ``floor(n1 * B)`` largest losses and keeps the next
    ``max(1, floor(n2 * B))``; HighRanking is MidRanking with ``n1 = 0``; LowRanking keeps
    the last ``max(1, floor(n2 * B))``.  When ``n1 + n2`` asks for more sequences than
    remain, the window slides up so that exactly ``max(1, floor(n2 * B))`` are kept.

    ``n_live`` may be a tensor (the count of live sequences, left on its device: no host
    synchronisation, nothing for ``torch.compile`` to break on); the bounds are then fp64
    tensors (floors of fp64 products, as Python's), else ints.
    """
    n = torch.as_tensor(n_live, dtype=torch.float64)
    keep = torch.minimum(torch.clamp(torch.floor(n2 * n), min=1.0), n)
    if method == "highranking":
        start = torch.zeros_like(n)
    elif method == "lowranking":
        start = n - keep
    else:
        start = torch.minimum(torch.floor(n1 * n), n - keep)
    if isinstance(n_live, torch.Tensor):
        return start, start + keep
    return int(start), int(start + keep)


def ranking_weights(seq_loss: torch.Tensor, live: torch.Tensor, method: str, n1: float, n2: float) -> torch.Tensor:
    """Equal weights on the window of the descending loss ranking chosen by ``method``.

    Ties are broken by position in the batch (stable sort), so the choice is deterministic.
    """
    key = torch.where(live, seq_loss.float(), float("-inf"))
    order = torch.sort(key, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    start, stop = ranking_window(live.sum(), method, n1, n2)
    kept = (rank >= start) & (rank < stop) & live
    return kept.float() / (stop - start).clamp_min(1).float()


def sequence_weights(
    seq_loss: torch.Tensor,
    n_tokens: torch.Tensor,
    *,
    method: str = "irdro",
    r: float = 10.0,
    n1: float = 0.25,
    n2: float = 0.25,
    seq_reduction: str = "mean",
) -> torch.Tensor:
    """Weights (B,) fp32 of ``method`` for per-sequence losses ``seq_loss`` (B,).

    ``"mean"`` reproduces the token-mean loss of the whole batch: ``n_i / sum(n)`` with
    ``seq_reduction="mean"`` and ``1 / sum(n)`` with ``"sum"``.
    """
    if not isinstance(seq_loss, torch.Tensor) or not isinstance(n_tokens, torch.Tensor):
        raise TypeError("seq_loss and n_tokens must be torch.Tensors")
    if seq_loss.dim() != 1 or seq_loss.shape != n_tokens.shape:
        raise ValueError(
            f"seq_loss and n_tokens must be 1-D of the same length, got shapes {tuple(seq_loss.shape)} "
            f"and {tuple(n_tokens.shape)}"
        )
    seq_loss = seq_loss.detach()
    live = n_tokens > 0
    if not live.numel():  # a batch of no sequences
        return seq_loss.new_zeros(0, dtype=torch.float32)
    if method == "irdro":
        return irdro_weights(seq_loss, live, r)
    if method in ("midranking", "highranking", "lowranking"):
        return ranking_weights(seq_loss, live, method, n1, n2)
    if method == "uniform":
        return live.float() / live.sum().clamp_min(1)
    if method == "mean":  # n_tokens may be fractional token masses (class or token weights)
        total = n_tokens.sum()
        per_seq = n_tokens if seq_reduction == "mean" else live
        return per_seq.float() / torch.where(total > 0, total, 1).float()
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def with_sample_weights(weights: torch.Tensor, sample_weight: torch.Tensor | None) -> torch.Tensor:
    """``weights`` times ``sample_weight``, renormalised to sum 1 (unchanged without sample
    weights; all 0 when every weighted sequence has sample weight 0).  For IR-DRO this is
    the solution of the KL-regularised DRO problem with ``sample_weight / sum`` as the
    reference distribution in place of the uniform one."""
    if sample_weight is None:
        return weights
    weighted = weights * sample_weight.to(weights.device, torch.float32)
    total = weighted.sum()
    return weighted / torch.where(total > 0, total, 1.0)
