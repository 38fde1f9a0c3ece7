"""``linear_cross_entropy``: the fused ``lm_head`` + cross-entropy, a drop-in for
``F.cross_entropy`` on the logits that never materialises them."""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import input_checks as check
from .op.dispatch import autocast_dtype, plain_backward, token_terms, wants_forward_gradients, weighted_sum
from .op.loss_terms import LossTerms
from .op.vocab_parallel import local_head
from .options import CrossEntropy, LCEOptions, refuse_on_sharded_head
from .tokens import shift_targets


class LCEOutput(NamedTuple):
    """What :func:`linear_cross_entropy` returns when any ``return_*`` option is set
    (fields not asked for are None)."""

    loss: torch.Tensor
    lse: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    token_accuracy: torch.Tensor | None = None
    predicted_tokens: torch.Tensor | None = None
    entropy: torch.Tensor | None = None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    options: LCEOptions | None = None,
    **keywords,
) -> torch.Tensor | LCEOutput:
    """Cross-entropy of ``softcap(hidden @ weight.T + bias) / temperature`` against
    ``targets``, fused: the (tokens x V) logits are never allocated.

    Called like ``F.cross_entropy(hidden @ weight.T, targets)`` it returns the same mean.
    With ``reduction="none"`` the loss is minus each target's log-probability, so
    ``-loss`` is the per-token log-prob with its gradient (what policy-gradient losses are
    built on; see ``hardfocus_fused.rl``); the backward accepts any per-token upstream
    gradient, so any weighting can be built on it.  Options left at their defaults cost
    nothing (the kernels are specialised on them).

    Args:
        hidden: (..., H) float32/bfloat16/float16 (float64 on ``impl="torch"``).
        weight: (V, H) classifier (lm_head) weight.
        targets: (...) integer class ids, ``ignore_index`` for positions to skip.
        bias: optional (V,) bias.
        options: an :class:`~hardfocus_fused.options.LCEOptions` (None: the defaults).
        **keywords: its fields, changing ``options``:

            - the per-token loss (:class:`~hardfocus_fused.options.CrossEntropy`):
              ``ignore_index`` (-100), ``label_smoothing`` (PyTorch's), ``class_weight``
              ((V,), PyTorch's ``weight``, Liger's ``ce_weight``), ``lse_square_scale``
              (Liger's z-loss ``s * lse^2``, unweighted by the class weights), ``softcap``
              (Gemma-2), ``temperature`` (the logits divided by it, as samplers do: one
              (tokens x H) copy of the hidden states when it is not 1);
            - ``reduction``: ``"mean"`` (default) over the scored positions, with class
              weights divided by their targets' weights as PyTorch does (0.0 when none is
              scored) and the z-loss part by their count (Liger's); ``"sum"``; ``"none"``,
              the fp32 per-token loss shaped like ``targets`` (0 where not scored);
            - ``shift``: True or ``k >= 0`` scores position t against ``targets[..., t + k]``
              (causal-LM labels: True); False (default) against ``t``;
            - extra outputs (:class:`~hardfocus_fused.options.Returns`): ``return_lse``
              (per-token log-sum-exp, differentiable), ``return_z_loss`` (reduced as in
              the loss, for logging), ``return_token_accuracy`` (per token for
              ``"none"``, their count for ``"sum"``, their fraction for ``"mean"``),
              ``return_predicted_tokens`` (each position's argmax, -1 where not scored),
              ``return_entropy`` (the softmax's entropy, differentiable);
            - how it runs (:class:`~hardfocus_fused.options.Execution`): ``impl``
              (``"auto"``: Triton for CUDA tensors; ``"triton"``, ``"torch"``),
              ``backward_impl`` (``"auto"``, ``"fused"``, ``"matmul"``, or ``"forward"``
              for a mean or sum with nothing else returned: three products instead of
              four), ``deterministic`` (bitwise-reproducible gradients; None follows
              ``torch.are_deterministic_algorithms_enabled()``), ``validate`` (check the
              targets' values: one host synchronisation on a GPU).

    Returns:
        The loss; with any ``return_*`` option an :class:`LCEOutput` ``(loss, lse, z_loss,
        token_accuracy, predicted_tokens, entropy)`` whose fields not asked for are None.

    Raises:
        ValueError, TypeError: an option, or an input, that cannot be used (named), before
            any kernel runs.
    """
    options = LCEOptions.build(options, **keywords)
    ce, returns, run = options.cross_entropy, options.returns, options.execution
    check.check_tensor("hidden", hidden, tuple(range(1, 9)))
    weight, bias, shard = local_head(weight, bias, options.sharding)
    if shard is not None:
        refuse_on_sharded_head(ce, run)
    check.check_head(hidden, weight, bias)
    n_vocab = shard.total if shard is not None else weight.shape[0]
    ce.check_head(n_vocab, weight.device)
    check.check_labels(
        "targets",
        targets,
        hidden.shape[:-1],
        n_vocab,
        ce.ignore_index,
        hidden.device,
        check_values=run.validate,
    )
    terms = ce.terms()
    if options.shift:
        if targets.dim() == 0:
            raise ValueError(f"shift={options.shift} needs targets with a sequence dimension")
        targets = shift_targets(targets, ce.ignore_index, shift=options.shift)
    flat, bias, softcap = tempered(hidden.reshape(-1, hidden.shape[-1]), bias, ce)
    flat_targets = targets.reshape(-1)
    check_name = check.deferred_label_check("targets", run.validate)
    autocast = autocast_dtype(hidden.device.type)
    known = options.known_up_front and shard is None
    needs = wants_forward_gradients(flat, weight, bias, run, autocast) if known else None
    if needs is not None:
        valid = flat_targets != ce.ignore_index
        # The per-token weights a sum or mean puts on the loss, known before the forward.
        token_weight = valid.float() if options.reduction == "sum" else terms.mean_weights(flat_targets, valid)
        loss, _ = weighted_sum(
            flat,
            weight,
            flat_targets,
            token_weight,
            bias,
            ce.ignore_index,
            softcap,
            needs,
            terms.kernel_terms(),
            check_name=check_name,
            autocast=autocast,
        )
        return loss
    loss, lse, best, entropy = token_terms(
        flat,
        weight,
        flat_targets,
        bias,
        ce.ignore_index,
        softcap,
        run.impl,
        run.deterministic,
        backward_impl=plain_backward(run.backward_impl),
        terms=terms.kernel_terms(),
        argmax=returns.argmax,
        check_name=check_name,
        entropy=returns.entropy,
        shard=shard,
    )
    valid = flat_targets != ce.ignore_index
    # With class weights and a z-loss together, the z-loss is added here from the
    # differentiable lse: a mean divides it by the token count, the rest by the class weights.
    z_apart = terms.z_loss(lse, valid) if terms.separate_z_loss else None
    reduction = options.reduction

    def reduce(per_token: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        if reduction == "mean":
            return terms.mean(per_token, z, flat_targets, valid)
        if z is not None:
            per_token = per_token + z
        return per_token.view(targets.shape) if reduction == "none" else per_token.sum()

    out = reduce(loss, z_apart)
    if not returns.any:
        return out
    correct = (best == flat_targets) & valid if returns.argmax else None
    accuracy = None
    if returns.token_accuracy:
        accuracy = (
            correct.float().view(targets.shape)
            if reduction == "none"
            else (correct.sum().float() if reduction == "sum" else correct.sum() / valid.sum().clamp_min(1))
        )
    return LCEOutput(
        loss=out,
        lse=lse.view(targets.shape) if returns.lse else None,
        z_loss=_reduced_z_loss(terms, lse.detach(), valid, reduction, targets.shape) if returns.z_loss else None,
        token_accuracy=accuracy,
        predicted_tokens=best.view(targets.shape) if returns.predicted_tokens else None,
        entropy=entropy.view(targets.shape) if returns.entropy else None,
    )


def tempered(
    flat: torch.Tensor, bias: torch.Tensor | None, ce: CrossEntropy
) -> tuple[torch.Tensor, torch.Tensor | None, float | None]:
    """``(hidden, bias, softcap)`` whose logits are ``ce``'s tempered ones:
    ``softcap(x) / T == (c / T) tanh((x / T) / (c / T))``, so dividing the hidden states,
    the bias and the cap by T divides the logits by T, with no change to the kernels."""
    t = ce.temperature
    if t == 1.0:
        return flat, bias, ce.softcap
    return (flat / t, bias / t if bias is not None else None, ce.softcap / t if ce.softcap is not None else None)


def _reduced_z_loss(
    terms: LossTerms, lse: torch.Tensor, valid: torch.Tensor, reduction: str, shape: torch.Size
) -> torch.Tensor:
    """The z-loss part of the loss, reduced as it is inside the loss (a mean over the scored
    tokens' count, whatever the class weights)."""
    z = terms.z_loss(lse, valid)
    if reduction == "none":
        return z.view(shape)
    return z.sum() if reduction == "sum" else z.sum() / valid.sum().clamp_min(1)
