"""``hardfocus_loss``: the paper's sequence-reweighted causal-LM loss on the fused op."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from . import input_checks as check
from .collectives import gather_ints
from .cross_entropy import tempered
from .op.dispatch import autocast_dtype, plain_backward, token_terms, wants_forward_gradients, weighted_sum
from .op.vocab_parallel import local_head
from .options import HardFocusOptions, Weighting, refuse_on_sharded_head
from .tokens import document_starts, segment_bounds, segment_sums, shift_targets
from .weighting.methods import sequence_weights, with_sample_weights


@dataclass(frozen=True)
class HardFocusStats:
    """Detached per-sequence statistics of one loss call (all shaped (B,), or (D,) with one
    entry per document, in order, when ``position_ids`` marked packed documents).

    ``loss == (weights * seq_loss).sum()`` for every method (times the world size with a
    ``group``), except ``method="mean"`` with ``class_weight`` and ``lse_square_scale``
    together: there ``weights`` are the cross-entropy's shares of the class-weight mass,
    and the z-loss part of each ``seq_loss`` is weighted by token counts (see
    ``op.loss_terms``).  Sequences without a target token have ``n_tokens == 0``,
    ``seq_loss == 0`` and ``weights == 0``.
    """

    seq_loss: torch.Tensor
    weights: torch.Tensor
    n_tokens: torch.Tensor


@dataclass(frozen=True)
class SequenceSums:
    """Per-sequence sums of one batch: the cross-entropy ``ce``, its mass (token count, or
    class and token weights), the separate z-loss ``z`` and its token ``count`` (None
    without one), and the scored-token counts ``n_tokens``."""

    ce: torch.Tensor
    mass: torch.Tensor
    z: torch.Tensor | None
    count: torch.Tensor | None
    n_tokens: torch.Tensor

    def summed_over(self, group) -> SequenceSums:
        """The whole sequences' sums when the ranks of ``group`` each hold a part of every
        sequence: one all-reduce of the detached sums (5 numbers per sequence at most)."""
        import torch.distributed as dist

        parts = [self.ce, self.mass, self.z, self.count]
        present = [part.detach().float() for part in parts if part is not None]
        stacked = torch.stack([*present, self.n_tokens.float()])
        dist.all_reduce(stacked, group=group)
        sums = iter(stacked.unbind(0))
        ce, mass, z, count = (next(sums) if part is not None else None for part in parts)
        return SequenceSums(ce, mass, z, count, next(sums).round().to(self.n_tokens.dtype))

    def losses(self, whole: SequenceSums, mean: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(cross-entropy, z-loss)`` per sequence of these sums: with ``mean``, each over
        the ``whole`` sequence's mass and token count (its own when it is whole)."""
        if not mean:
            return self.ce, self.z
        ce = self.ce / torch.where(whole.mass > 0, whole.mass, 1.0)
        z = self.z / torch.where(whole.count > 0, whole.count, 1.0) if self.z is not None else None
        return ce, z


def hardfocus_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    token_weight: torch.Tensor | None = None,
    sample_weight: torch.Tensor | None = None,
    options: HardFocusOptions | None = None,
    **keywords,
) -> torch.Tensor | tuple[torch.Tensor, HardFocusStats]:
    """Sequence-reweighted language-model loss computed without materialising logits.

    Args:
        hidden: (B, T, H) final hidden states, float32/bfloat16/float16.
        weight: (V, H) lm_head weight.
        labels: (B, T) int64 labels in the Hugging Face convention (``ignore_index`` to skip).
        bias: optional (V,) lm_head bias.
        position_ids: (B, T) position ids of packed rows (several documents per row, as
            ``DataCollatorWithFlattening`` produces).  A new document starts wherever the
            position id drops to 0 (see ``tokens.document_starts``); each document is one
            "sequence" of the weighting, and with ``shift=True`` no document is scored on
            the next one's first token.  Costs one host synchronisation (the document
            count).
        attention_mask: (B, T), with ``position_ids`` only: positions where it is 0 are
            padding, which never starts a document and joins the adjacent one (as in the
            model's own loss).  Without it, a row's leading run of one repeated non-zero
            position id before its first 0 (how ``generate`` fills left padding) is taken
            as padding.
        token_weight: (B, T) non-negative weights of the positions (aligned with
            ``labels``, before the shift: the weight of position t's target label
            ``labels[:, t + shift]`` is ``token_weight[:, t + shift]``), multiplying each
            token's loss; a sequence's mean divides by its token weights' sum, so they
            are relative weights within the sequence; 0 drops a token.
        sample_weight: (B,) non-negative weights of the rows (of each row's documents with
            ``position_ids``): the method's sequence weights are multiplied by them and
            renormalised to sum 1 (for IR-DRO, the DRO solution with ``sample_weight`` as
            the reference distribution).  Not with a weighting rule (callable ``method``).
        options: a :class:`~hardfocus_fused.options.HardFocusOptions` (None: the defaults).
        **keywords: its fields, changing ``options``:

            - the weighting (:class:`~hardfocus_fused.options.Weighting`): ``method``
              (``"irdro"``: ``w = softmax(L / r)``; ``"midranking"``: skip the
              ``floor(n1 B)`` largest losses, keep the next ``max(1, floor(n2 B))``;
              ``"highranking"``, ``"lowranking"``, ``"uniform"``, ``"mean"``: the token
              mean over the batch, the standard causal-LM loss; or a weighting rule, a
              callable ``(seq_loss, n_tokens) -> weights``), ``r`` (10.0, as in the paper),
              ``n1``, ``n2`` (0.25), ``seq_reduction`` (``L_i`` is the ``"mean"`` or
              ``"sum"`` of its tokens' losses), ``group`` and ``sequence_group`` (below);
            - the per-token loss (:class:`~hardfocus_fused.options.CrossEntropy`), as for
              :func:`~hardfocus_fused.linear_cross_entropy`: ``ignore_index``,
              ``label_smoothing``, ``class_weight``, ``lse_square_scale``, ``softcap``,
              ``temperature``.  With class weights a sequence's mean divides its
              cross-entropy by its targets' weights (PyTorch's weighted mean) and its
              z-loss by its token count (Liger's), and ``method="mean"`` is
              ``linear_cross_entropy(..., class_weight=..., reduction="mean")``;
            - ``shift``: True (default) scores position t against ``labels[:, t + 1]``,
              False against ``labels[:, t]``, ``k >= 0`` against ``labels[:, t + k]``;
            - ``return_stats``: also return a :class:`HardFocusStats`;
            - how it runs (:class:`~hardfocus_fused.options.Execution`): ``impl``,
              ``backward_impl`` (``"forward"``: three products, for ``method="mean"`` and
              ``"uniform"`` without ``group`` or ``sequence_group``, whose weights are
              known before the forward), ``deterministic``, ``validate``.

            ``group``, a ``torch.distributed`` process group (data parallel): ``None``
            (default, as in the paper's code) weighs the local batch only.  With a group,
            the per-sequence losses of all ranks are all-gathered (B floats per rank, no
            logits), the weights are computed over the global batch, and each rank
            returns ``world_size * sum_{i local} w_i L_i``: DDP's (or FSDP's) gradient
            averaging then yields exactly ``sum_i w_i grad L_i`` over the global batch.
            The value on one rank is therefore not the global loss; the mean of the
            returned values over the ranks is.  Stats hold this rank's sequences with
            their global weights.

            ``sequence_group``, a process group whose ranks each hold a part of every
            sequence along the time axis (context parallelism; labels shifted before the
            split, ``shift=False``): each sequence's loss sums and token counts are summed
            over the group (an all-reduce of a few floats per sequence) before weighting,
            so every rank has the unsplit batch's ``L_i`` and weights, and returns
            ``world * sum_i w_i L_i^part`` (this rank's part of each ``L_i``; ``world`` the
            product of both groups' sizes), which gradient averaging over all ranks turns
            into the unsplit batch's gradient.  Stats hold the whole sequences' values.

    Returns:
        The 0-dim fp32 loss ``sum_i w_i L_i`` (weights are constants for autograd), and the
        stats if asked.  A batch without any target token gives 0.0 and zero gradients.
    """
    options = HardFocusOptions.build(options, **keywords)
    ce, weighting, run = options.cross_entropy, options.weighting, options.execution
    method = weighting.method
    check.check_tensor("hidden", hidden, 3)
    weight, bias, shard = local_head(weight, bias, options.sharding)
    if shard is not None:
        refuse_on_sharded_head(ce, run)
    check.check_head(hidden, weight, bias)
    n_vocab = shard.total if shard is not None else weight.shape[0]
    ce.check_head(n_vocab, weight.device)
    check.check_labels(
        "labels", labels, hidden.shape[:2], n_vocab, ce.ignore_index, hidden.device, check_values=run.validate
    )
    shift = options.shift
    terms = ce.terms()
    if token_weight is not None:
        token_weight = check.check_data_weight("token_weight", token_weight, labels.shape, hidden.device, run.validate)
        token_weight = shift_targets(token_weight, 0, shift=shift) if shift else token_weight
    if sample_weight is not None:
        sample_weight = check.check_data_weight(
            "sample_weight", sample_weight, labels.shape[:1], hidden.device, run.validate
        )
        if callable(method):
            raise ValueError(
                "sample_weight is not supported with a weighting rule (callable method): fold the "
                "sample weights into the rule"
            )
    if weighting.sequence_group is not None:
        check_sequence_split(weighting.sequence_group, labels, options.shift, position_ids)
    starts = None
    if position_ids is not None:
        check.check_position_ids("position_ids", position_ids, labels)
        if attention_mask is not None:
            check.check_position_ids("attention_mask", attention_mask, labels)
        starts = document_starts(position_ids, attention_mask)
    elif attention_mask is not None:
        raise ValueError(
            "attention_mask is only used with position_ids (to tell padding from documents); "
            "padding is otherwise marked by ignore_index labels"
        )
    n_seq, seq_len, n_hidden = hidden.shape
    targets = shift_targets(labels, ce.ignore_index, starts, shift).reshape(-1)
    flat, bias, softcap = tempered(hidden.reshape(-1, n_hidden), bias, ce)
    ignore_index = ce.ignore_index
    check_name = check.deferred_label_check("labels", run.validate)
    # The token mean and the uniform baseline weigh sequences by their sizes alone: every
    # token's weight is known before the forward (the three-product path, if it pays).
    needs = (
        wants_forward_gradients(flat, weight, bias, run, autocast_dtype(hidden.device.type))
        if options.known_up_front and shard is None
        else None
    )
    if needs is not None:
        return _known_weights_loss(
            flat,
            weight,
            bias,
            targets,
            starts,
            (n_seq, seq_len),
            weighting,
            ignore_index,
            softcap,
            terms,
            token_weight,
            sample_weight,
            needs,
            check_name,
            options.return_stats,
        )
    token_loss, lse, *_ = token_terms(
        flat,
        weight,
        targets,
        bias,
        ignore_index,
        softcap,
        run.impl,
        run.deterministic,
        backward_impl=plain_backward(run.backward_impl),
        terms=terms.kernel_terms(),
        check_name=check_name,
        shard=shard,
    )
    valid = targets != ignore_index
    # With class weights and a z-loss, the z-loss is kept apart (from the differentiable lse):
    # a sequence's mean divides it by the token count, the cross-entropy by the class weights.
    z_loss = terms.z_loss(lse, valid) if terms.separate_z_loss else None
    # Each token's share of its sequence: 1, times its target's class weight and its token
    # weight (from the data and from a token-level rule).
    token_scale = _token_scale(
        method, token_weight, token_loss if z_loss is None else token_loss + z_loss, valid, (n_seq, seq_len)
    )
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
    # Split sequences: this rank's parts of the sums (differentiable) and the whole
    # sequences' sums (detached, summed over the sequence group); else one and the same.
    part = whole = SequenceSums(seq_ce, seq_mass, seq_z, seq_count, n_tokens)
    if weighting.sequence_group is not None:
        whole = part.summed_over(weighting.sequence_group)
        seq_mass, seq_count, n_tokens = whole.mass, whole.count, whole.n_tokens
    mean = weighting.seq_reduction == "mean"
    seq_ce, seq_z = part.losses(whole, mean)
    # This rank's part of each L_i, and L_i of the whole sequence (what the weights and
    # stats are of).
    seq_part = _with_z(seq_ce, seq_z)
    seq_loss = seq_part if whole is part else _with_z(*whole.losses(whole, mean))
    weigh = (
        method
        if callable(method)
        else functools.partial(
            sequence_weights,
            method=method,
            r=weighting.r,
            n1=weighting.n1,
            n2=weighting.n2,
            seq_reduction=weighting.seq_reduction,
        )
    )
    if sample_weight is not None and rows is not None:
        sample_weight = sample_weight[rows]  # a row's weight for each of its documents
    # The token mean weighs sequences by their mass (their token count when unweighted).
    weights, scale = _weights(
        weigh, seq_loss, seq_mass if method == "mean" else n_tokens, weighting.group, sample_weight
    )
    if weighting.sequence_group is not None:
        scale *= torch.distributed.get_world_size(weighting.sequence_group)
    if seq_z is not None and method == "mean":
        # The token mean's separate z-loss is a mean over tokens, not over class-weight mass.
        z_weights, _ = _weights(weigh, seq_loss, seq_count, weighting.group, sample_weight)
        loss = ((weights * seq_ce).sum() + (z_weights * seq_z).sum()) * scale
    else:
        loss = (weights * seq_part).sum() * scale
    if not options.return_stats:
        return loss
    return loss, HardFocusStats(seq_loss=seq_loss.detach(), weights=weights, n_tokens=n_tokens)


def _with_z(ce: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
    """A sequence's loss: its cross-entropy part, plus its separate z-loss part if any."""
    return ce if z is None else ce + z


def check_sequence_split(group, labels: torch.Tensor, shift: int, position_ids: torch.Tensor | None) -> None:
    """One-line errors for what a ``sequence_group`` cannot take: labels shifted inside each
    rank's part (the last position of a part predicts the next rank's first label), packed
    documents (a document's identity across the parts), and ranks holding different
    batches (one all-gather of the batch size)."""
    if shift:
        raise ValueError(
            "sequence_group needs labels shifted before the sequences were split (shift=False): with "
            f"shift={shift} the last positions of each rank's part would be scored on nothing"
        )
    if position_ids is not None:
        raise ValueError("sequence_group does not take position_ids: packed documents cannot be split across ranks")
    sizes = [size for (size,) in gather_ints((labels.shape[0],), group, labels.device)]
    if len(set(sizes)) > 1:
        raise ValueError(
            f"sequence_group: the ranks hold parts of different batches (batch sizes {sizes}); each rank must "
            "hold a part of every sequence"
        )


def _sequences(valid: torch.Tensor, starts: torch.Tensor | None, shape: tuple[int, int]):
    """``(n_tokens, per_seq, rows, bounds)``: each sequence's scored-token count, the fp32
    per-sequence sum of flat per-token values, and for packed rows (one sequence per
    document) each sequence's row and the documents' ``segment_bounds`` (else None, None)."""
    n_seq, seq_len = shape
    if starts is None:
        per_seq = lambda values: values.view(n_seq, seq_len).sum(dim=1, dtype=torch.float32)  # noqa: E731
        return valid.view(n_seq, seq_len).sum(dim=1), per_seq, None, None
    bounds = segment_bounds(starts.reshape(-1))
    return (
        segment_sums(valid, bounds).round().long(),
        functools.partial(segment_sums, bounds=bounds),
        bounds[:-1] // seq_len,
        bounds,
    )


def _known_weights_loss(
    flat,
    weight,
    bias,
    targets,
    starts,
    shape,
    weighting: Weighting,
    ignore_index,
    softcap,
    terms,
    token_weight,
    sample_weight,
    needs,
    check_name,
    return_stats,
):
    """``hardfocus_loss`` for ``method="mean"``/``"uniform"`` by the three-product path
    (``op.dispatch.weighted_sum``): the sequence weights depend on the sizes alone, so each token's
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
    method, seq_reduction = weighting.method, weighting.seq_reduction
    weigh = functools.partial(sequence_weights, method=method, seq_reduction=seq_reduction)
    weights = with_sample_weights(
        weigh(torch.zeros_like(seq_mass), seq_mass if method == "mean" else n_tokens), sample_weight
    )
    denominator = torch.where(seq_mass > 0, seq_mass, 1.0) if seq_reduction == "mean" else torch.ones_like(seq_mass)
    per_token = (weights / denominator)[seq_of_token]
    per_token = torch.where(valid, per_token if scale is None else per_token * scale, 0.0)
    loss, token_loss = weighted_sum(
        flat,
        weight,
        targets,
        per_token,
        bias,
        ignore_index,
        softcap,
        needs,
        terms.kernel_terms(),
        check_name=check_name,
        autocast=autocast_dtype(flat.device.type),
    )
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
    from .weighting.global_batch import global_weights

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
                raise ValueError(
                    f"{type(method).__name__}.token_weights must return a ({shape[0]}, {shape[1]}) "
                    f"tensor, got {getattr(chosen, 'shape', type(chosen).__name__)}"
                )
            chosen = chosen.detach().reshape(-1).float()
            scale = chosen if scale is None else scale * chosen
    return scale


class HardFocusLoss(nn.Module):
    """Module form of :func:`hardfocus_loss`: its options (a
    :class:`~hardfocus_fused.options.HardFocusOptions`, or its fields as keywords) are
    fixed and checked at construction."""

    def __init__(self, options: HardFocusOptions | None = None, **keywords) -> None:
        super().__init__()
        self.options = HardFocusOptions.build(options, **keywords)

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        bias: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_weight: torch.Tensor | None = None,
        sample_weight: torch.Tensor | None = None,
    ):
        return hardfocus_loss(
            hidden,
            weight,
            labels,
            bias=bias,
            position_ids=position_ids,
            attention_mask=attention_mask,
            token_weight=token_weight,
            sample_weight=sample_weight,
            options=self.options,
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.as_keywords().items())
