"""What the patched ``lm_head`` computes: the targets of one forward call, and how its
loss is scaled for the ``transformers.Trainer`` or reported in evaluation."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..loss import HardFocusStats
from ..options import HardFocusOptions
from ..tokens import document_starts, shift_targets


@dataclass
class Targets:
    """The targets lm_head's hidden states are scored against, with the position ids and
    attention mask of the same positions (None when the call had none)."""

    targets: torch.Tensor
    position_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None
    token_weight: torch.Tensor | None = None


def call_targets(
    labels,
    shift_labels,
    position_ids,
    attention_mask,
    logits_to_keep,
    device,
    ignore_index: int = -100,
    token_weight: torch.Tensor | None = None,
) -> Targets:
    """Targets of the positions ``lm_head`` sees, from the arguments the model was called with.

    ``labels`` are shifted by one, never across a document boundary of packed rows
    (``position_ids``, with ``attention_mask`` marking padding); ``shift_labels`` are used as
    given.  ``logits_to_keep`` (an int, or a 1-D tensor of positions) keeps the positions
    the model gives to ``lm_head``.  ``token_weight`` (aligned with ``labels``, or with
    ``shift_labels`` when those are given) is shifted and kept alike.
    """
    labels = labels.to(device)
    if position_ids is not None:
        position_ids = position_ids.to(device).expand(labels.shape)
    if attention_mask is not None and (attention_mask.dim() != 2 or position_ids is None):
        attention_mask = None  # a 4-D mask, or padding told by the labels alone
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
    if token_weight is not None:
        token_weight = token_weight.to(device).float()
        if shift_labels is None:
            token_weight = shift_targets(token_weight, 0)
    if shift_labels is not None:
        targets = shift_labels.to(device)
    else:
        starts = document_starts(position_ids, attention_mask) if position_ids is not None else None
        targets = shift_targets(labels, ignore_index, starts)
    if isinstance(logits_to_keep, int):
        index = slice(-logits_to_keep, None) if logits_to_keep > 0 else slice(None)
    elif isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.dim() == 1:
        index = logits_to_keep.to(device)
    else:
        raise ValueError("with labels, logits_to_keep must be an int or a 1-D tensor of positions")

    def keep(t):
        return t[:, index] if t is not None else None

    return Targets(keep(targets), keep(position_ids), keep(attention_mask), keep(token_weight))


def token_mean(stats: HardFocusStats, seq_reduction: str) -> torch.Tensor:
    """The plain token-mean NLL of the batch (the model's own loss) from its stats."""
    token_sums = stats.seq_loss * stats.n_tokens if seq_reduction == "mean" else stats.seq_loss
    return token_sums.sum() / stats.n_tokens.sum().clamp_min(1)


def trainer_factor(
    stats: HardFocusStats, num_items_in_batch, method, group, trainer_loss_scale: int | None
) -> torch.Tensor | float:
    """What turns this micro-batch's loss into the one the ``transformers.Trainer`` expects.

    The Trainer passes ``num_items_in_batch`` (the step's target count: over all ranks
    when ``average_tokens_across_devices``, the default, else this rank's), sums the
    micro-batch losses of a step without dividing by their number, and multiplies the
    loss by the world size when it averages tokens across devices; DDP then averages
    the gradients.  So:

    - built-in methods, no group: each micro-batch's loss is weighted by its share of
      the step's targets (``method="mean"`` is then exactly the Trainer's own loss);
    - built-in methods with ``group``: the loss (already ``world * local share``) is
      weighted by the group's micro-batch targets over the sum of every rank's
      ``num_items_in_batch``, which is right in both Trainer modes: ``world * N_step``
      when the Trainer then multiplies by ``world``, ``N_step`` when it does not;
    - a weighting rule (``AccumulatedIRDRO``, ``TwoPassRanking``) normalises over the
      step itself; only the Trainer's multiplication (``trainer_loss_scale``, which
      :class:`~hardfocus_fused.hf.trainer.AccumulationCallback` reads from its arguments)
      is undone.
    """
    if callable(method):
        if trainer_loss_scale is None:
            if _world_size() > 1:
                raise ValueError(
                    "a weighting rule (method=AccumulatedIRDRO/TwoPassRanking) under a multi-process "
                    "Trainer needs hardfocus_fused.hf.trainer.AccumulationCallback, which reads how "
                    "the Trainer scales the loss"
                )
            trainer_loss_scale = 1
        return 1.0 / trainer_loss_scale
    n_tokens = stats.n_tokens.sum()
    if group is None:
        return n_tokens / num_items_in_batch
    counts = torch.stack(
        [n_tokens.to(torch.float64), torch.as_tensor(num_items_in_batch, dtype=torch.float64, device=n_tokens.device)]
    )
    torch.distributed.all_reduce(counts, group=group)
    return (counts[0] / counts[1]).float()


def batch_options(options: HardFocusOptions) -> HardFocusOptions:
    """The loss options for a call that must not touch a weighting rule's state
    (evaluation): a rule from ``hardfocus_fused.weighting.accumulate`` becomes its per-batch method
    (``rule.batch_options()``), any other callable the token mean; the weights are over
    this rank's batch."""
    method = options.weighting.method
    if callable(method):
        per_batch = getattr(method, "batch_options", None)
        options = options.replace(**(per_batch() if callable(per_batch) else {"method": "mean"}))
    return options.replace(group=None)


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
