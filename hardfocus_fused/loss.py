"""``hardfocus_loss``: the paper's sequence-reweighted causal-LM loss on the fused op."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from . import _validation as check
from ._tokens import document_starts, segment_bounds, segment_sums, shift_targets
from .lce import FORWARD_ONLY_WHEN_KNOWN, autocast_dtype, token_terms, wants_forward_gradients, weighted_sum
from .weighting import sequence_weights, with_sample_weights


@dataclass(frozen=True)
class HardFocusStats:
    """Detached per-sequence statistics of one loss call (all shaped (B,), or (D,) with one
    entry per document, in order, when ``position_ids`` marked packed documents).

    ``loss == (weights * seq_loss).sum()`` for every method (times the world size with a
    ``group``), except ``method="mean"`` with ``class_weight`` and ``lse_square_scale``
    together: there ``weights`` are the cross-entropy's shares of the class-weight mass,
    and the z-loss part of each ``seq_loss`` is weighted by token counts (see
    ``ce_terms``).  Sequences without a target token have ``n_tokens == 0``,
    ``seq_loss == 0`` and ``weights == 0``.
    """

    seq_loss: torch.Tensor
    weights: torch.Tensor
    n_tokens: torch.Tensor


def hardfocus_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    method: str = "irdro",
    r: float = 10.0,
    n1: float = 0.25,
    n2: float = 0.25,
    seq_reduction: str = "mean",
    ignore_index: int = -100,
    shift: bool | int = True,
    softcap: float | None = None,
    impl: str = "auto",
    return_stats: bool = False,
    validate: bool = True,
    deterministic: bool | None = None,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    group=None,
    backward_impl: str = "auto",
    label_smoothing: float = 0.0,
    class_weight: torch.Tensor | None = None,
    lse_square_scale: float = 0.0,
    token_weight: torch.Tensor | None = None,
    sample_weight: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, HardFocusStats]:
    """Sequence-reweighted language-model loss computed without materialising logits.

    Args:
        hidden: (B, T, H) final hidden states, float32/bfloat16/float16.
        weight: (V, H) lm_head weight.
        labels: (B, T) int64 labels in the Hugging Face convention (``ignore_index`` to skip).
        bias: optional (V,) lm_head bias.
        method: ``"irdro"`` (``w = softmax(L / r)``), ``"midranking"`` (skip the
            ``floor(n1 B)`` largest losses, keep the next ``max(1, floor(n2 B))``),
            ``"highranking"``, ``"lowranking"``, ``"uniform"`` or ``"mean"`` (token mean over
            the batch: the standard Hugging Face causal-LM loss); or a weighting rule, a
            callable ``(seq_loss, n_tokens) -> weights`` of (B,) tensors, such as the
            global-batch helpers in ``hardfocus_fused.accumulate``.
        r: IR-DRO temperature (10 in the paper).
        n1, n2: MidRanking fractions (0.25 in the paper).
        seq_reduction: per-sequence loss ``L_i`` is the ``"mean"`` or ``"sum"`` of its token NLL.
        ignore_index: label value that is not scored (any integer, as in PyTorch).
        shift: if True position t is scored against ``labels[:, t + 1]``; if False against
            ``labels[:, t]``; an integer ``k >= 0`` scores it against ``labels[:, t + k]``.
        softcap: Gemma-2 final-logit soft-capping, applied inside the kernel.
        impl: ``"triton"``, ``"torch"`` or ``"auto"`` (Triton on CUDA tensors, torch otherwise).
        return_stats: also return a :class:`HardFocusStats`.
        validate: check that every label is in ``[0, V)`` or ``ignore_index`` (always
            cheap on CPU; one host synchronisation on GPU). ``False`` skips the check, and
            an out-of-range label then gives an undefined loss.
        deterministic: bitwise-reproducible gradients on the same device: the Triton
            backward runs without atomics (one more logit recompute).  ``None`` (default)
            follows ``torch.are_deterministic_algorithms_enabled()``.
        position_ids: (B, T) position ids of packed rows (several documents per row, as
            ``DataCollatorWithFlattening`` produces).  A new document starts wherever the
            position id drops to 0 (see ``_tokens.document_starts``); each document is one
            "sequence" of the weighting, and with ``shift=True`` no document is scored on
            the next one's first token.  Costs one host synchronisation (the document
            count).
        attention_mask: (B, T), with ``position_ids`` only: positions where it is 0 are
            padding, which never starts a document and joins the adjacent one (as in the
            model's own loss).  Without it, a row's leading run of one repeated non-zero
            position id before its first 0 (how ``generate`` fills left padding) is taken
            as padding.
        group: a ``torch.distributed`` process group (data parallel).  ``None`` (default,
            as in the paper's code) weighs the local batch only.  With a group, the
            per-sequence losses of all ranks are all-gathered (B floats per rank, no
            logits), the weights are computed over the global batch, and each rank returns
            ``world_size * sum_{i local} w_i L_i``: DDP's (or FSDP's) gradient averaging
            then yields exactly ``sum_i w_i grad L_i`` over the global batch.  The value
            on one rank is therefore not the global loss; the mean of the returned values
            over the ranks is (``dist.all_reduce(loss.detach()) / world_size``).  Stats
            hold this rank's sequences with their global weights.
        backward_impl: the Triton path's backward strategy, ``"auto"`` (the cost model's
            choice for the device), ``"fused"``, ``"matmul"`` or, for ``method="mean"`` and
            ``"uniform"`` without ``group`` (whose weights are known before the forward),
            ``"forward"`` (three products; see :func:`~hardfocus_fused.linear_cross_entropy`).
        label_smoothing, class_weight, lse_square_scale: the per-token loss, as for
            :func:`~hardfocus_fused.linear_cross_entropy` (PyTorch's label smoothing and
            class weights, Liger's z-loss).  With class weights a sequence's mean divides
            its cross-entropy by its targets' weights (PyTorch's weighted mean) and its
            z-loss by its token count (Liger's), and ``method="mean"`` is
            ``linear_cross_entropy(..., class_weight=..., reduction="mean")`` over the
            batch.
        token_weight: (B, T) non-negative weights of the positions (aligned with
            ``labels``, before the shift: the weight of position t's target label
            ``labels[:, t + shift]`` is ``token_weight[:, t + shift]``), multiplying each
            token's loss; a sequence's mean divides by its token weights' sum, so they
            are relative weights within the sequence; 0 drops a token.
        sample_weight: (B,) non-negative weights of the rows (of each row's documents with
            ``position_ids``): the method's sequence weights are multiplied by them and
            renormalised to sum 1 (for IR-DRO, the DRO solution with ``sample_weight`` as
            the reference distribution).  Not with a weighting rule (callable ``method``).

    Returns:
        The 0-dim fp32 loss ``sum_i w_i L_i`` (weights are constants for autograd), and the
        stats if asked.  A batch without any target token gives 0.0 and zero gradients.
    """
    check.check_tensor("hidden", hidden, 3)
    check.check_head(hidden, weight, bias)
    check.check_weighting(method, r, n1, n2, seq_reduction)
    check.check_softcap(softcap)
    check.check_labels("labels", labels, hidden.shape[:2], weight.shape[0], ignore_index, hidden.device,
                       check_values=validate)

    shift = check.check_shift(shift)
    terms = check.check_loss_terms(label_smoothing, class_weight, lse_square_scale, weight.shape[0], weight.device)
    if token_weight is not None:
        token_weight = check.check_data_weight("token_weight", token_weight, labels.shape, hidden.device, validate)
        token_weight = shift_targets(token_weight, 0, shift=shift) if shift else token_weight
    if sample_weight is not None:
        sample_weight = check.check_data_weight("sample_weight", sample_weight, labels.shape[:1], hidden.device,
                                                validate)
        if callable(method):
            raise ValueError("sample_weight is not supported with a weighting rule (callable method): fold the "
                             "sample weights into the rule")
    starts = None
    if position_ids is not None:
        check.check_position_ids("position_ids", position_ids, labels)
        if attention_mask is not None:
            check.check_position_ids("attention_mask", attention_mask, labels)
        starts = document_starts(position_ids, attention_mask)
    elif attention_mask is not None:
        raise ValueError("attention_mask is only used with position_ids (to tell padding from documents); "
                         "padding is otherwise marked by ignore_index labels")
    n_seq, seq_len, n_hidden = hidden.shape
    targets = shift_targets(labels, ignore_index, starts, shift).reshape(-1)
    flat = hidden.reshape(-1, n_hidden)
    check_name = check.deferred_label_check("labels", validate)
    # The token mean and the uniform baseline weigh sequences by their sizes alone: every
    # token's weight is known before the forward (the three-product path, if it pays).
    known = isinstance(method, str) and method in ("mean", "uniform") and group is None and not terms.separate_z_loss
    if backward_impl == "forward" and not known:
        raise ValueError(FORWARD_ONLY_WHEN_KNOWN)
    needs = wants_forward_gradients(flat, weight, bias, impl, deterministic, backward_impl,
                                    autocast_dtype(hidden.device.type)) if known else None
    if needs is not None:
        return _known_weights_loss(flat, weight, bias, targets, starts, (n_seq, seq_len), method, seq_reduction,
                                   ignore_index, softcap, terms, token_weight, sample_weight, needs, check_name,
                                   return_stats)
    if backward_impl == "forward":
        backward_impl = "auto"      # nothing to differentiate, or the torch path: the plain forward
    token_loss, lse, *_ = token_terms(flat, weight, targets, bias, ignore_index, softcap,
                                     impl, deterministic, backward_impl=backward_impl, terms=terms.kernel_terms(),
                                     check_name=check_name)
    valid = targets != ignore_index
    # With class weights and a z-loss, the z-loss is kept apart (from the differentiable lse):
    # a sequence's mean divides it by the token count, the cross-entropy by the class weights.
    z_loss = terms.z_loss(lse, valid) if terms.separate_z_loss else None
    # Each token's share of its sequence: 1, times its target's class weight and its token
    # weight (from the data and from a token-level rule).
    token_scale = _token_scale(method, token_weight, token_loss if z_loss is None else token_loss + z_loss, valid,
                               (n_seq, seq_len))
    count = valid.float()
    mass = terms.target_weight(targets, valid)
    mass = count if mass is None else mass
    if token_scale is not None:
        token_loss, mass, count = token_loss * token_scale, mass * token_scale, count * token_scale
        z_loss = z_loss * token_scale if z_loss is not None else None
        valid = valid & (token_scale > 0)
    n_tokens, per_seq, rows, _ = _sequences(valid, starts, (n_seq, seq_len))
    # L_i = its cross-entropy part (over its mass) + its separate z-loss part (over its count).
    seq_ce, seq_mass = per_seq(token_loss), per_seq(mass)
    seq_z = per_seq(z_loss) if z_loss is not None else None
    seq_count = per_seq(count) if z_loss is not None else None
    if seq_reduction == "mean":
        seq_ce = seq_ce / torch.where(seq_mass > 0, seq_mass, 1.0)
        if seq_z is not None:
            seq_z = seq_z / torch.where(seq_count > 0, seq_count, 1.0)
    seq_loss = seq_ce if seq_z is None else seq_ce + seq_z
    if callable(method):
        weigh = method
    else:
        weigh = functools.partial(sequence_weights, method=method, r=r, n1=n1, n2=n2, seq_reduction=seq_reduction)
    if sample_weight is not None and rows is not None:
        sample_weight = sample_weight[rows]             # a row's weight for each of its documents
    # The token mean weighs sequences by their mass (their token count when unweighted).
    weights, scale = _weights(weigh, seq_loss, seq_mass if method == "mean" else n_tokens, group, sample_weight)
    if seq_z is not None and method == "mean":
        # The token mean's separate z-loss is a mean over tokens, not over class-weight mass.
        z_weights, _ = _weights(weigh, seq_loss, seq_count, group, sample_weight)
        loss = ((weights * seq_ce).sum() + (z_weights * seq_z).sum()) * scale
    else:
        loss = (weights * seq_loss).sum() * scale
    if not return_stats:
        return loss
    return loss, HardFocusStats(seq_loss=seq_loss.detach(), weights=weights, n_tokens=n_tokens)


def _sequences(valid: torch.Tensor, starts: torch.Tensor | None, shape: tuple[int, int]):
    """``(n_tokens, per_seq, rows, bounds)``: each sequence's scored-token count, the fp32
    per-sequence sum of flat per-token values, and for packed rows (one sequence per
    document) each sequence's row and the documents' ``segment_bounds`` (else None, None)."""
    n_seq, seq_len = shape
    if starts is None:
        per_seq = lambda values: values.view(n_seq, seq_len).sum(dim=1, dtype=torch.float32)  # noqa: E731
        return valid.view(n_seq, seq_len).sum(dim=1), per_seq, None, None
    bounds = segment_bounds(starts.reshape(-1))
    return (segment_sums(valid, bounds).round().long(), functools.partial(segment_sums, bounds=bounds),
            bounds[:-1] // seq_len, bounds)


def _known_weights_loss(flat, weight, bias, targets, starts, shape, method, seq_reduction, ignore_index, softcap,
                        terms, token_weight, sample_weight, needs, check_name, return_stats):
    """``hardfocus_loss`` for ``method="mean"``/``"uniform"`` by the three-product path
    (``lce.weighted_sum``): the sequence weights depend on the sizes alone, so each token's
    weight ``w_i * scale_t / mass_i`` is set before the forward."""
    valid = targets != ignore_index
    mass = terms.target_weight(targets, valid)
    mass = valid.float() if mass is None else mass
    scale = token_weight.reshape(-1).float() if token_weight is not None else None
    if scale is not None:
        mass, valid = mass * scale, valid & (scale > 0)
    n_tokens, per_seq, rows, bounds = _sequences(valid, starts, shape)
    position = torch.arange(valid.numel(), device=valid.device)
    seq_of_token = position // shape[1] if bounds is None else torch.searchsorted(bounds[1:], position, right=True)
    seq_mass = per_seq(mass)
    if sample_weight is not None and rows is not None:
        sample_weight = sample_weight[rows]
    weigh = functools.partial(sequence_weights, method=method, seq_reduction=seq_reduction)
    weights = with_sample_weights(weigh(torch.zeros_like(seq_mass), seq_mass if method == "mean" else n_tokens),
                                  sample_weight)
    denominator = torch.where(seq_mass > 0, seq_mass, 1.0) if seq_reduction == "mean" else torch.ones_like(seq_mass)
    per_token = (weights / denominator)[seq_of_token]
    per_token = torch.where(valid, per_token if scale is None else per_token * scale, 0.0)
    loss, token_loss = weighted_sum(flat, weight, targets, per_token, bias, ignore_index, softcap, needs,
                                    terms.kernel_terms(), check_name=check_name,
                                    autocast=autocast_dtype(flat.device.type))
    if not return_stats:
        return loss
    token_loss = token_loss if scale is None else token_loss * scale
    seq_loss = per_seq(token_loss) / denominator
    return loss, HardFocusStats(seq_loss=seq_loss, weights=weights, n_tokens=n_tokens)


def _weights(weigh, seq_loss, counts, group, sample_weight) -> tuple[torch.Tensor, int]:
    """``(weights, scale)``: the rule's sequence weights (with the sample weights), over the
    local batch (scale 1) or the group's global batch (scale: the world size)."""
    if group is None:
        return with_sample_weights(weigh(seq_loss, counts), sample_weight), 1
    from .distributed import global_weights

    return global_weights(seq_loss, counts, group, weigh, sample_weight)


def _token_scale(method, token_weight, token_loss, valid, shape) -> torch.Tensor | None:
    """The data's token weights times a token-level rule's (``method.token_weights``), flat,
    or None when there are neither."""
    scale = token_weight.reshape(-1).float() if token_weight is not None else None
    rule = getattr(method, "token_weights", None) if callable(method) else None
    if rule is not None:
        chosen = rule(token_loss.detach().view(shape), valid.view(shape))
        if chosen is not None:
            if not isinstance(chosen, torch.Tensor) or chosen.shape != shape:
                raise ValueError(f"{type(method).__name__}.token_weights must return a ({shape[0]}, {shape[1]}) "
                                 f"tensor, got {getattr(chosen, 'shape', type(chosen).__name__)}")
            chosen = chosen.detach().reshape(-1).float()
            scale = chosen if scale is None else scale * chosen
    return scale


class HardFocusLoss(nn.Module):
    """Module form of :func:`hardfocus_loss`; options are fixed at construction."""

    def __init__(
        self,
        *,
        method: str = "irdro",
        r: float = 10.0,
        n1: float = 0.25,
        n2: float = 0.25,
        seq_reduction: str = "mean",
        ignore_index: int = -100,
        shift: bool | int = True,
        softcap: float | None = None,
        impl: str = "auto",
        return_stats: bool = False,
        validate: bool = True,
        deterministic: bool | None = None,
        group=None,
        backward_impl: str = "auto",
        label_smoothing: float = 0.0,
        class_weight: torch.Tensor | None = None,
        lse_square_scale: float = 0.0,
    ) -> None:
        super().__init__()
        check.check_weighting(method, r, n1, n2, seq_reduction)
        check.check_softcap(softcap)
        check.check_choice("impl", impl, check.IMPLS)
        check.check_shift(shift)
        check.check_choice("backward_impl", backward_impl, check.BACKWARD_IMPLS)
        check.check_loss_terms(label_smoothing, class_weight, lse_square_scale,
                               class_weight.shape[0] if isinstance(class_weight, torch.Tensor) else 0, None)
        self.options = dict(method=method, r=r, n1=n1, n2=n2, seq_reduction=seq_reduction,
                            ignore_index=ignore_index, shift=shift, softcap=softcap, impl=impl,
                            return_stats=return_stats, validate=validate, deterministic=deterministic,
                            group=group, backward_impl=backward_impl, label_smoothing=label_smoothing,
                            class_weight=class_weight, lse_square_scale=lse_square_scale)

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                bias: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, token_weight: torch.Tensor | None = None,
                sample_weight: torch.Tensor | None = None):
        return hardfocus_loss(hidden, weight, labels, bias=bias, position_ids=position_ids,
                              attention_mask=attention_mask, token_weight=token_weight, sample_weight=sample_weight,
                              **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
