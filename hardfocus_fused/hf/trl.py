"""TRL: ``HardFocusSFTTrainer``, an ``SFTTrainer`` that trains on a patched model's loss, and
``HardFocusGRPOTrainer``, a ``GRPOTrainer`` whose per-token log-probabilities and
entropies come from the fused kernels (``use_fused_logprobs``).

TRL's ``SFTTrainer`` (1.x) computes its training loss itself, from per-token
log-probabilities of its own fused LM head, so a model patched with
:func:`~hardfocus_fused.apply_hardfocus` would train unweighted; the patch refuses that
with a ``ValueError``.  This subclass keeps everything else of ``SFTTrainer`` (dataset
preparation, packing, chat templates, PEFT, callbacks) and takes the loss from the
model, as the ``transformers.Trainer`` does: the sample-reweighted loss, with the
Trainer's gradient accumulation and multi-process scaling handled by the patch.  A
``sample_weight`` column of the dataset (one number per example) reaches the loss (not
with ``packing``, whose rows mix examples).  Its
logs have the loss but not TRL's ``entropy`` and ``mean_token_accuracy``, which come from
TRL's own head.
"""

from __future__ import annotations

import contextlib
import functools
import types

import torch
from transformers import Trainer
from trl import GRPOTrainer, SFTTrainer

from ..cross_entropy import LCEOutput, linear_cross_entropy
from .parts import unwrap
from .patch import DATA_COLUMNS, _is_dtensor, hardfocus_patch
from .trainer import WeightColumns, take_label_smoothing


class HardFocusSFTTrainer(SFTTrainer):
    """``trl.SFTTrainer`` whose loss is the patched model's (see the module docstring).

    The model must be patched with ``apply_hardfocus`` before (or right after) the trainer
    is built; a model that is not patched is refused.  ``label_smoothing_factor`` is moved
    into the fused loss (``hf.trainer.take_label_smoothing``).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        take_label_smoothing(self)
        # The datasets' weight columns (apply_hardfocus's token_weight / sample_weight) are
        # kept and carried through TRL's collator, which pads on the right.
        self.data_collator = WeightColumns(self.data_collator, padding_side="right")

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, *DATA_COLUMNS]))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        take_label_smoothing(self)  # when the model was patched after the trainer was built
        if hardfocus_patch(self.model) is None:
            raise ValueError(
                "HardFocusSFTTrainer trains a model patched with hardfocus_fused.apply_hardfocus; "
                "patch the model first, or use trl.SFTTrainer"
            )
        return Trainer.compute_loss(
            self, model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        return Trainer.prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=ignore_keys)


# What TRL's fused LM head can be asked for that the fused op computes (TRL's own head also
# offers "log_sum_sq_probs" and "mean_logits").
FUSED_OUTPUTS = ("log_probs", "entropy", "is_top1")


def _logit_transform(model) -> tuple[float, float | None]:
    """``(scale, softcap)`` of ``model``'s logits, as ``apply_hardfocus``'s patch-time probe
    measures them (and refuses architectures it cannot reproduce)."""
    from . import apply_hardfocus, remove_hardfocus

    patch = hardfocus_patch(apply_hardfocus(model, method="mean"))
    try:
        return patch.scale, patch.softcap
    finally:
        remove_hardfocus(model)


def use_fused_logprobs(
    model: torch.nn.Module,
    *,
    temperature: float = 1.0,
    outputs: tuple[str, ...] = ("log_probs",),
    cast_lm_head_to_fp32: bool = False,
) -> torch.nn.Module:
    """Make ``model(..., labels=labels, fused_lm_head=True)`` (the protocol of TRL's fused
    LM head, which TRL's trainers call for per-token log-probabilities) run on the fused
    kernels: the backbone's hidden states go through :func:`~hardfocus_fused.linear_cross_entropy`
    with ``temperature`` and the model's logit scale and soft-cap (measured by
    ``apply_hardfocus``'s probe), and TRL's ``FusedCausalLMOutput`` comes back with
    ``log_probs`` and, as asked in ``outputs``, ``entropy`` (differentiable) and
    ``is_top1``.  ``cast_lm_head_to_fp32`` (TRL's option of that name) multiplies in fp32
    outside autocast.  Without ``fused_lm_head`` the model's forward is the one it had.

    Raises:
        ValueError: an output the fused op does not compute, a model patched with
            ``apply_hardfocus`` (its loss is not the policy's), or, at call time, MoE router
            logits (their load-balancing loss is not computed here).
    """
    from trl.trainer.utils import FusedCausalLMOutput

    unknown = [name for name in outputs if name not in FUSED_OUTPUTS]
    if unknown or "log_probs" not in outputs:
        raise ValueError(
            f"use_fused_logprobs computes {FUSED_OUTPUTS} (log_probs always); {unknown or outputs} asked for"
        )
    target = unwrap(model)
    if hardfocus_patch(target) is not None:
        raise ValueError(
            f"{type(target).__name__} is patched with apply_hardfocus, whose sample-reweighted loss is "
            f"not a policy-gradient loss: remove_hardfocus(model) before training it with GRPO"
        )
    scale, softcap = _logit_transform(target)
    previous = target.forward
    config = target.config.get_text_config() if hasattr(target.config, "get_text_config") else target.config

    @functools.wraps(type(target).forward)  # keeps the signature: generate checks its kwargs against it
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            given = dict(labels=labels, shift_labels=shift_labels, num_items_in_batch=num_items_in_batch)
            return previous(*args, **kwargs, **{k: v for k, v in given.items() if v is not None})
        if kwargs.get("output_router_logits") or getattr(config, "output_router_logits", False):
            raise ValueError(
                "use_fused_logprobs does not compute the MoE load-balancing loss; turn output_router_logits off"
            )
        if labels is None and shift_labels is None:
            raise ValueError("fused_lm_head=True needs labels (or shift_labels): the tokens to score")
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        head = self.get_output_embeddings()
        weight, bias = head.weight, head.bias
        if _is_dtensor(weight):
            raise ValueError(
                "use_fused_logprobs needs lm_head's whole weight; it is a DTensor here (FSDP2 or tensor "
                "parallel with lm_head sharded on its own): keep lm_head in the root unit"
            )
        hidden, labels = hidden.to(weight.device), labels.to(weight.device)
        if scale != 1.0:
            hidden = hidden * scale
            bias = bias * scale if bias is not None else None
        precision = contextlib.nullcontext()
        if cast_lm_head_to_fp32:
            hidden, weight = hidden.float(), weight.float()
            bias = bias.float() if bias is not None else None
            precision = torch.autocast(hidden.device.type, enabled=False)
        with precision:
            out = linear_cross_entropy(
                hidden,
                weight,
                labels,
                bias=bias,
                softcap=softcap,
                temperature=temperature,
                reduction="none",
                return_entropy="entropy" in outputs,
                return_predicted_tokens="is_top1" in outputs,
            )
        out = out if isinstance(out, LCEOutput) else LCEOutput(out)
        mask = labels != -100
        log_probs = -out.loss
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(
            loss=-log_probs.sum() / count,
            log_probs=log_probs,
            entropy=out.entropy,
            label_mask=mask,
            is_top1=(out.predicted_tokens == labels) & mask if "is_top1" in outputs else None,
        )

    target.forward = types.MethodType(forward, target)
    return model


class HardFocusGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` whose per-token log-probabilities and entropies (of the policy and
    of the reference model) come from the fused kernels (:func:`use_fused_logprobs`)
    instead of TRL's chunked PyTorch head; everything else, the loss included, is TRL's.

    Switched on like the SFT trainer: build it in place of ``GRPOTrainer``.  The model must
    not be patched with ``apply_hardfocus``.  Options whose loss the fused head cannot
    produce are refused when the trainer is built: ``use_liger_kernel`` (Liger replaces the
    head) and MoE router logits (``output_router_logits``).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if getattr(self.args, "use_liger_kernel", False):
            raise ValueError(
                "HardFocusGRPOTrainer computes the log-probabilities with its own fused head; "
                "use_liger_kernel=True would replace it: leave it off"
            )
        policy = self.model.get_base_model() if hasattr(self.model, "peft_config") else self.model
        fp32 = getattr(self.args, "cast_lm_head_to_fp32", False)
        use_fused_logprobs(
            policy, temperature=self.temperature, outputs=("log_probs", "entropy"), cast_lm_head_to_fp32=fp32
        )
        if self.ref_model is not None:
            use_fused_logprobs(self.ref_model, temperature=self.temperature, cast_lm_head_to_fp32=fp32)
        if getattr(policy.config.get_text_config(), "output_router_logits", False):
            raise ValueError(
                "HardFocusGRPOTrainer does not compute the MoE load-balancing loss; set the model's "
                "output_router_logits=False"
            )
