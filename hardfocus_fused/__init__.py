"""hardfocus-fused: IR-DRO / MidRanking sample-reweighted LM loss on fused Triton kernels."""

from .hf import apply_hardfocus, hardfocus_patch, remove_hardfocus
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


def __getattr__(name: str):
    if name == "HardFocusCallback":   # needs transformers, imported only when asked for
        from .hf_trainer import HardFocusCallback

        return HardFocusCallback
    raise AttributeError(f"module 'hardfocus_fused' has no attribute {name!r}")
__version__ = "0.1.0"
