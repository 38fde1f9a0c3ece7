"""Hugging Face integration: ``apply_hardfocus(model)`` for any causal LM, one mechanism.

Every Hugging Face causal LM computes its training loss the same way: the backbone gives
the final hidden states, ``self.lm_head`` turns them into logits, optional elementwise
post-processing follows (Gemma-2's soft-capping, Cohere's or Granite's logit scaling), and
``self.loss_function(logits, labels, ...)`` scores them.  The patch keeps the model's own
``forward`` (so every kwarg, cache, gradient-checkpointing and MoE auxiliary-loss path is
the model's) and intercepts the two ends on the model *instance*:

- when ``labels`` are passed, ``lm_head`` computes :func:`hardfocus_loss` from the hidden
  states it is given, its weight and bias, the labels and the post-processing (which the
  patch measured at patch time), and returns an empty ``(..., 0)`` tensor instead of the
  logits, so the post-processing costs nothing and no ``[tokens x vocab]`` tensor exists;
- ``loss_function`` checks that it was given the same labels and returns that loss.

The loss is computed inside ``lm_head``'s own call because that is where the head's weight
is guaranteed to be whole: FSDP (1 and 2) gathers a sharded ``lm_head`` in the module's
pre-forward hook and frees it after the forward (DeepSpeed ZeRO-3 uses the same kind of
hooks; not tested here).  The empty tensor depends on the loss and ``loss_function`` adds
its (zero) sum, so the backward passes through ``lm_head``'s output and the wrapper's
pre-backward hook gathers the weight again before the loss's own backward runs; the
gradient reaches the hidden states ``lm_head`` was given, where the wrapper's
post-backward hook reduces the weight's gradient.

At patch time a probe (a few no-grad forwards on 8 random tokens) measures the
post-processing: the logits the model returns must equal ``softcap(scale * lm_head(h))``
with the architecture's ``final_logit_softcapping`` and a fitted constant ``scale``, also
with the logits driven far into the soft-capping range, and the patched loss must equal the
unpatched model's loss.  An architecture whose forward does anything else (another head, a
loss computed without ``loss_function``, a non-elementwise transform of the logits) fails
the probe and is refused with a ``ValueError``, never trained on a wrong loss.

After patching, guards turn what would silently bypass the patch into a ``ValueError``
naming the fix (``patch.BYPASS_HELP``): a training forward without labels (the
Trainer's label smoothing or ``compute_loss_func``), the backbone run for training outside
the patched forward (TRL's own fused head), and a head replaced after patching.  In
evaluation (eval mode, no grad) the loss is the plain token mean and the logits are
returned (``eval_logits``).

The pieces of this subpackage: ``parts`` (the model inside its wrappers, its head and
backbone), ``patch`` (the patch object and what it installs), ``loss`` (targets of a call,
the Trainer's loss scaling, evaluation), ``probe`` (the patch-time probe), ``stats_log``
(logged statistics), ``trainer`` (Trainer callbacks), ``trl`` (TRL's trainers).  Nothing
here imports transformers at import time except ``trainer`` and ``trl``.
"""

from __future__ import annotations

import warnings

from torch import nn

from ..options import HardFocusOptions
from .parts import backbone_of, find_linear_head, not_causal_lm, unwrap  # noqa: F401  (find_linear_head re-exported)
from .patch import HardFocusPatch, hardfocus_patch
from .stats_log import log_tensors, log_values  # noqa: F401  (re-exported)


def apply_hardfocus(
    model: nn.Module,
    options: HardFocusOptions | None = None,
    *,
    eval_logits: bool = True,
    verify: bool = True,
    **keywords,
) -> nn.Module:
    """Make ``model`` (a Hugging Face causal LM, or a PEFT model around one) train on the
    sample-reweighted loss, computed by the fused kernels without logits.

    With ``labels`` in training the patched forward returns ``loss = hardfocus_loss(...)``
    and ``logits=None``, and the output carries ``hardfocus_stats`` (a
    :class:`HardFocusStats`: per-sequence losses, weights and token counts).  In evaluation
    (eval mode under ``torch.no_grad()``, as ``Trainer.evaluate`` runs) the loss is the
    plain token-mean NLL, comparable between methods, and the logits are returned unless
    ``eval_logits=False``.  Without labels (generation, inference) the model behaves exactly
    as before; a training forward without labels raises a ``ValueError`` (the loss would be
    computed elsewhere, unweighted).  Only this instance is patched; patching it again
    replaces the earlier patch, with a warning.

    ``position_ids`` with resets to 0 (``DataCollatorWithFlattening``) make each packed
    document a sequence of the weighting (``attention_mask`` marks padding, which never
    starts a document).  Under the Trainer with gradient accumulation
    (``num_items_in_batch``), each micro-batch's weighted loss is scaled by its share of the
    step's target tokens, so ``method="mean"`` gives exactly the standard loss and the
    weighted methods weight sequences within each micro-batch (over all ranks of
    ``group``); a weighting rule from ``hardfocus_fused.weighting.accumulate`` weighs the whole
    step (see ``hf.loss.trainer_factor``).

    The model may be patched before or after it is wrapped in DDP or FSDP (1 or 2), and
    ``lm_head`` may be sharded as its own FSDP unit: the loss is computed inside
    ``lm_head``'s call, where the wrapper has gathered its weight.

    Args:
        model: the model to patch (or a PEFT, DDP or FSDP1 wrapper around it); returned,
            patched in place.
        options: a :class:`~hardfocus_fused.options.HardFocusOptions` (None: the defaults).
        **keywords: its fields, changing ``options``, as for :func:`hardfocus_loss`: the
            weighting (``method``, ``r``, ``n1``, ``n2``, ``seq_reduction``, ``group``: weights
            over a data-parallel group's global batch), ``label_smoothing``,
            ``class_weight``, ``lse_square_scale``, and how it runs (``impl``,
            ``backward_impl``, ``deterministic``, ``validate``).  What the model defines
            itself is not an option here: ``softcap`` (its config's
            ``final_logit_softcapping``), ``ignore_index`` (-100), ``shift`` (the model
            shifts its labels), ``temperature`` and ``return_stats`` (the output carries
            the stats).  The batch columns ``token_weight`` (aligned with ``labels``) and
            ``sample_weight`` (one per row), when the model is called with them, are
            ``hardfocus_loss``'s; the Trainer keeps them (the patched forward's signature
            names them) and ``hf.trainer.WeightColumns`` pads them in a collator.
        eval_logits: return the logits from evaluation forwards (what ``compute_metrics``
            needs; as much memory as the unpatched model's evaluation).  ``False`` keeps
            evaluation logit-free too (``logits=None``).
        verify: run the patch-time probe (a few no-grad forwards on 8 random tokens) that
            measures the logit post-processing and refuses architectures it cannot match.

    Raises:
        TypeError: ``model`` is not a module, or ``lm_head`` is not an ``nn.Linear`` (e.g.
            LoRA applied to the head).
        ValueError: not a causal LM, or the probe found logits or a loss the patch cannot
            reproduce.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be a loaded torch.nn.Module (a transformers causal LM), got "
            f"{type(model).__name__} {model!r:.80}; load it first, e.g. "
            f"AutoModelForCausalLM.from_pretrained(name)"
        )
    options = model_options(HardFocusOptions.build(options, **keywords))
    if not isinstance(eval_logits, bool):
        raise TypeError(f"eval_logits must be True or False, got {eval_logits!r}")
    target = unwrap(model)
    previous = hardfocus_patch(target)
    if previous is not None:
        warnings.warn(
            f"{type(target).__name__} was already patched by apply_hardfocus (method="
            f"{previous.options.weighting.method!r}); that patch is replaced by this one",
            stacklevel=2,
        )
        remove_hardfocus(target)
    config = getattr(target, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"{type(target).__name__} is an encoder-decoder model, not a causal language model; "
            f"apply_hardfocus patches causal LMs (what AutoModelForCausalLM loads)"
        )
    reason = not_causal_lm(target)
    if reason is not None:
        raise ValueError(
            f"{type(target).__name__} is not a causal language model: it is {reason}; apply_hardfocus "
            f"patches causal LMs (what AutoModelForCausalLM loads)"
        )
    head = find_linear_head(target)
    if not hasattr(target, "loss_function"):
        raise ValueError(
            f"{type(target).__name__} has no loss_function; apply_hardfocus needs a transformers "
            f"causal LM that computes its loss through self.loss_function"
        )
    options.cross_entropy.check_head(head.out_features, None)
    refuse_logit_loss_terms(target)
    if _tensor_parallel(target, head) or options.sharding.vocab_group is not None:
        raise ValueError(
            f"apply_hardfocus does not patch a head sharded over the vocabulary yet ({type(target).__name__}"
            ".lm_head is tensor-parallel): call hardfocus_loss(hidden, lm_head.weight, labels, ...) on the "
            "model's hidden states, which takes the DTensor (or vocab_group and vocab_start)"
        )
    patch = HardFocusPatch(target, head, backbone_of(target), options, eval_logits=eval_logits)
    patch.install()
    if verify:
        try:
            from .probe import probe

            probe(patch, model)  # through the wrappers, which gather sharded weights
        except Exception:
            patch.uninstall()
            raise
    return model


# What a Hugging Face model defines itself: not options of apply_hardfocus (the patch sets
# them per model, see HardFocusPatch.compute).
MODEL_DEFINED = {
    "ignore_index": "the models score labels -100 as ignored",
    "softcap": "the patch reads the config's final_logit_softcapping",
    "temperature": "training uses the logits as they are",
    "shift": "the model shifts its labels itself",
    "return_stats": "the output carries hardfocus_stats",
}


# Loss terms a model's forward adds from the logits themselves, by the attribute that turns
# them on (transformers 5.25: Bamba's z-loss; no other causal LM adds one).  The patch never
# forms the logits, so such a model is refused by name.  Bamba's term averages over every
# position, padding and unlabelled ones included, which lse_square_scale (over the scored
# tokens, a sequence's mean in IR-DRO's per-sequence losses) does not reproduce.
LOGIT_LOSS_TERMS = {
    "z_loss_coefficient": "z_loss_coefficient * logsumexp(logits)^2 averaged over every position (padding included)",
}


def refuse_logit_loss_terms(model: nn.Module) -> None:
    """A one-line ``ValueError`` naming the setting, when ``model`` adds a loss term of
    ``LOGIT_LOSS_TERMS`` (read where its forward reads it: the model, else its config)."""
    config = getattr(model, "config", None)
    for field, term in LOGIT_LOSS_TERMS.items():
        value = getattr(model, field, getattr(config, field, None))
        if isinstance(value, (int, float)) and value:
            raise ValueError(
                f"cannot patch {type(model).__name__}: its forward adds {term} to the loss ({field}={value:g}), "
                f"from logits the fused loss never forms; set model.{field} = 0 (and model.config.{field} = 0 to "
                f"save it so) to train on the fused loss, and pass lse_square_scale={value:g} to apply_hardfocus "
                f"for a z-loss over the scored tokens instead"
            )


def _tensor_parallel(model: nn.Module, head: nn.Module) -> bool:
    """Whether ``head``'s weight is a ``DTensor`` of a tensor-parallel plan: one that FSDP2
    does not manage (FSDP2 also holds its parameters as ``DTensor`` shards, and gathers them
    before the head runs)."""
    if type(head.weight).__name__ != "DTensor":
        return False
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return True
    return not any(isinstance(module, FSDPModule) for module in model.modules())


def model_options(options: HardFocusOptions) -> HardFocusOptions:
    """``options`` for a patched model: refused in one line where it sets what the model
    defines itself (``MODEL_DEFINED``)."""
    given, defaults = options.as_keywords(), HardFocusOptions().as_keywords()
    for name, why in MODEL_DEFINED.items():
        if given[name] != defaults[name]:
            raise ValueError(f"apply_hardfocus does not take {name}: {why}")
    if options.weighting.sequence_group is not None:
        raise ValueError(
            "apply_hardfocus does not take sequence_group: the model shifts its labels within each rank's part "
            "of a sequence; call hardfocus_loss(..., shift=False, sequence_group=...) on labels shifted before "
            "the split"
        )
    return options


def remove_hardfocus(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_hardfocus`; a model that is not patched is returned unchanged."""
    patch = hardfocus_patch(unwrap(model))
    if patch is not None:
        patch.uninstall()
    return model
