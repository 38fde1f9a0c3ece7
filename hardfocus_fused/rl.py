"""Policy-gradient losses on the fused op: per-token log-probabilities and entropies without
logits, and GRPO-family objectives as plain O(tokens) PyTorch on them.

:func:`token_logprobs` runs the fused op once (``linear_cross_entropy`` with
``reduction="none"``, ``return_entropy``, ``temperature``); everything else here is
elementwise math on (B, T) tensors, so the backward runs through the fused kernels with
per-token coefficients that these formulas produce:

- :func:`clipped_surrogate`: GRPO's / PPO's clipped importance-weighted advantage, with
  DAPO's asymmetric ``epsilon_low`` / ``epsilon_high``;
- :func:`k3_kl`: the k3 estimator of KL(policy || reference) from the reference's
  log-probs;
- :func:`aggregate`: the loss aggregations users choose between (``"grpo"``: per-sequence
  token mean, then the mean over sequences; ``"bnpo"`` / ``"dapo"``: token mean over the
  batch; ``"dr_grpo"``: a constant normaliser, batch x maximum completion length);
- :func:`grpo_loss`: all of it together, with an entropy bonus, as TRL's ``GRPOTrainer``
  defines it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cross_entropy import linear_cross_entropy
from .options import LCEOptions

LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    options: LCEOptions | None = None,
    **keywords,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(log_probs, entropy)`` (B, T) fp32 of each position's target under
    ``softmax(softcap(hidden @ weight.T + bias) / temperature)``, both differentiable, 0
    where not scored (``entropy`` None unless asked for with ``return_entropy=True``).

    ``options`` and ``keywords`` are :func:`~hardfocus_fused.linear_cross_entropy`'s
    (``temperature``, ``softcap``, ``ignore_index``, ``return_entropy``, ``impl``,
    ``deterministic``, ``backward_impl``, ...), with two defaults of their own:
    ``shift=True``, so position t is scored on ``labels[:, t + 1]`` (the Hugging Face
    convention, as in ``hardfocus_loss``; mask prompts and padding with ``ignore_index``),
    and ``reduction="none"``, the only reduction it takes.  The ``[tokens x vocab]`` logits
    are never materialised; the entropy's gradient is applied inside the fused backward.
    """
    options = LCEOptions.build(options if options is not None else LCEOptions(shift=True, reduction="none"), **keywords)
    if options.reduction != "none":
        raise ValueError(
            f"token_logprobs gives per-token log-probabilities: reduction must be 'none', got {options.reduction!r}"
        )
    out = linear_cross_entropy(hidden, weight, labels, bias=bias, options=options)
    if options.returns.entropy:
        return -out.loss, out.entropy
    return -out, None


def clipped_surrogate(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``(loss, clipped)``: ``-min(ratio A, clip(ratio, 1 - epsilon_low, 1 +
    epsilon_high) A)`` with ``ratio = exp(log_probs - old_log_probs)``, and where the
    clipped term was the smaller one.  ``advantages`` is (B,) per sequence or (B, T) per
    token; ``epsilon_high`` defaults to ``epsilon_low`` (DAPO raises it)."""
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    ratio = torch.exp(log_probs - old_log_probs)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high) * advantages
    return -torch.minimum(unclipped, clipped), clipped < unclipped


def k3_kl(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || reference): ``exp(r) - r - 1``, ``r =
    ref_log_probs - log_probs`` (non-negative, unbiased for samples of the policy)."""
    log_ratio = ref_log_probs - log_probs
    return torch.exp(log_ratio) - log_ratio - 1.0


def aggregate(
    per_token: torch.Tensor, mask: torch.Tensor, loss_type: str = "grpo", max_completion_length: int | None = None
) -> torch.Tensor:
    """The scalar loss from per-token values and the (B, T) mask of completion tokens:
    ``"grpo"`` the mean over sequences of each one's token mean; ``"bnpo"`` and ``"dapo"``
    the token mean over the batch; ``"dr_grpo"`` the sum over ``B * max_completion_length``
    (a constant normaliser: no length bias)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    mask = mask.to(per_token.dtype)
    total = per_token * mask
    if loss_type == "grpo":
        return (total.sum(-1) / mask.sum(-1).clamp_min(1.0)).mean()
    if loss_type in ("bnpo", "dapo"):
        return total.sum() / mask.sum().clamp_min(1.0)
    if max_completion_length is None or max_completion_length < 1:
        raise ValueError("loss_type='dr_grpo' needs max_completion_length >= 1 (its constant normaliser)")
    return total.sum() / (per_token.shape[0] * max_completion_length)


@dataclass(frozen=True)
class PolicyLoss:
    """:func:`grpo_loss`'s result: the loss to backpropagate and detached diagnostics."""

    loss: torch.Tensor
    clip_fraction: torch.Tensor  # share of the completion tokens whose clipped term was used
    kl: torch.Tensor | None  # token mean of the k3 KL (with a reference)
    entropy: torch.Tensor | None  # token mean of the entropy (when given)


def grpo_loss(
    log_probs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    old_log_probs: torch.Tensor | None = None,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    beta: float = 0.0,
    ref_log_probs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
) -> PolicyLoss:
    """GRPO's objective on per-token log-probs (B, T) of the completion tokens (``mask``).

    ``old_log_probs`` (default: ``log_probs`` detached, one update per generation) give the
    importance ratio; the clipped surrogate (:func:`clipped_surrogate`) plus ``beta`` times
    the k3 KL to the reference's log-probs, aggregated by ``loss_type`` (:func:`aggregate`);
    minus ``entropy_coef`` times the token mean of ``entropy`` (an exploration bonus).
    """
    if old_log_probs is None:
        old_log_probs = log_probs.detach()
    per_token, clipped = clipped_surrogate(log_probs, old_log_probs, advantages, epsilon_low, epsilon_high)
    kl = None
    if beta:
        if ref_log_probs is None:
            raise ValueError("beta > 0 needs ref_log_probs (the reference policy's log-probs of the same tokens)")
        token_kl = k3_kl(log_probs, ref_log_probs)
        per_token = per_token + beta * token_kl
        kl = _token_mean(token_kl.detach(), mask)
    loss = aggregate(per_token, mask, loss_type, max_completion_length)
    mean_entropy = None
    if entropy is not None:
        mean_entropy = _token_mean(entropy, mask)
        if entropy_coef:
            loss = loss - entropy_coef * mean_entropy
        mean_entropy = mean_entropy.detach()
    elif entropy_coef:
        raise ValueError("entropy_coef needs the entropy (token_logprobs(..., return_entropy=True))")
    return PolicyLoss(
        loss=loss, clip_fraction=_token_mean(clipped.to(log_probs.dtype), mask), kl=kl, entropy=mean_entropy
    )


def _token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)
