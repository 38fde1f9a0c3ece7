"""hardfocus-fused: IR-DRO / MidRanking sample-reweighted LM loss on fused Triton kernels.

The package has three parts:

- the loss core, at this level: the weighting (``weighting``, ``rules``, ``accumulate``,
  ``distributed``), the fused op and its autograd functions (``lce``, ``ce_terms``,
  ``triton_op``, ``torch_op``), the sample-reweighted loss (``loss``), and the Triton
  kernels (``hardfocus_fused.kernels``);
- ``hardfocus_fused.hf``: the Hugging Face integration (``apply_hardfocus``, Trainer and TRL);
- ``hardfocus_fused.experiment``: the paper's experiment and the command lines.

``import hardfocus_fused`` loads the core only: the integration's names below are imported
when first used, and neither the core nor the integration needs transformers to import.
"""

from .lce import LCEOutput, linear_cross_entropy
from .loss import HardFocusLoss, HardFocusStats, hardfocus_loss
from .weighting import METHODS, sequence_weights

__all__ = [
    "hardfocus_loss",
    "HardFocusLoss",
    "HardFocusStats",
    "linear_cross_entropy",
    "LCEOutput",
    "sequence_weights",
    "METHODS",
    "apply_hardfocus",
    "remove_hardfocus",
    "hardfocus_patch",
    "HardFocusCallback",
]

# Names of the Hugging Face integration exported here, and the module that defines each.
_INTEGRATION = {
    "apply_hardfocus": "hf",
    "remove_hardfocus": "hf",
    "hardfocus_patch": "hf",
    "HardFocusCallback": "hf.trainer",   # needs transformers
}


def __getattr__(name: str):
    module = _INTEGRATION.get(name)
    if module is None:
        raise AttributeError(f"module 'hardfocus_fused' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
