"""Where a model's parts are: the transformers model inside PEFT, DDP and FSDP1 wrappers,
its linear output head, and the backbone that runs before the head.  Used by both
``apply_hardfocus`` and the patch's guards."""

from __future__ import annotations

import sys

import torch
from torch import nn


def _wrapper_types() -> tuple[type, ...]:
    """``DistributedDataParallel`` and FSDP1's ``FullyShardedDataParallel``: modules that
    hold the module they run as ``.module``."""
    if not torch.distributed.is_available():
        return ()
    from torch.distributed.fsdp import FullyShardedDataParallel

    return nn.parallel.DistributedDataParallel, FullyShardedDataParallel


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside PEFT, DDP and FSDP1 wrappers (FSDP2 wraps nothing)."""
    while True:
        get_base = getattr(model, "get_base_model", None)
        if callable(get_base) and hasattr(model, "peft_config"):
            model = get_base()
        elif isinstance(model, _wrapper_types()):
            model = model.module
        else:
            return model


def find_linear_head(model: nn.Module) -> nn.Linear:
    """``model``'s output embeddings as the ``nn.Linear`` whose ``forward`` computes the
    logits (inside an FSDP1 wrapper, the wrapped one: the wrapper gathers its weight)."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        raise ValueError(
            f"{type(model).__name__} has no output embeddings (lm_head): not a causal language "
            f"model; apply_hardfocus patches causal LMs (what AutoModelForCausalLM loads)"
        )
    head = unwrap(head)
    if isinstance(head, nn.Linear) and not hasattr(head, "base_layer"):
        return head
    kind = f"{type(head).__module__}.{type(head).__qualname__}"
    if hasattr(head, "base_layer"):  # a PEFT tuner layer (LoRA, ...) around the head
        raise TypeError(
            f"{type(model).__name__}'s lm_head carries a PEFT adapter ({kind}); hardfocus needs a plain "
            f"torch.nn.Linear head: leave lm_head out of the adapter's target_modules, or merge the "
            f"adapter (merge_and_unload) before apply_hardfocus"
        )
    raise TypeError(
        f"{type(model).__name__}'s lm_head is a {kind}, not a torch.nn.Linear; apply_hardfocus needs a "
        f"plain linear head"
    )


def backbone_of(model: nn.Module) -> nn.Module | None:
    """The module the model runs before ``lm_head`` (``model.base_model``), if it is one."""
    backbone = getattr(model, "base_model", None)
    return backbone if isinstance(backbone, nn.Module) and backbone is not model else None


# transformers' task mappings whose models are not causal LMs (a class listed in one of
# these and not among the causal LMs is refused by name, before the probe).
_OTHER_TASKS = {
    "MASKED_LM": "a masked language model",
    "SEQUENCE_CLASSIFICATION": "a sequence classifier",
    "TOKEN_CLASSIFICATION": "a token classifier",
    "QUESTION_ANSWERING": "a question-answering model",
    "MULTIPLE_CHOICE": "a multiple-choice model",
    "PRETRAINING": "a pre-training model",
}


def not_causal_lm(model: nn.Module) -> str | None:
    """Why ``model`` is not a causal LM, when transformers says so by its class (e.g. "a
    masked language model"), with the causal LM class of the same family if there is one;
    None when it is one or transformers does not know the class."""
    if "transformers" not in sys.modules:
        return None
    from transformers.models.auto import modeling_auto as auto

    name = type(model).__name__
    causal = auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if name in causal.values():
        return None
    for task, what in _OTHER_TASKS.items():
        mapping = getattr(auto, f"MODEL_FOR_{task}_MAPPING_NAMES", {})
        for model_type, names in mapping.items():
            if name in (names if isinstance(names, tuple) else (names,)):
                alternative = causal.get(model_type)
                return what + (f" (the {model_type} causal LM is {alternative})" if alternative else "")
    return None
