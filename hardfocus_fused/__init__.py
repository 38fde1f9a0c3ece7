"""hardfocus-fused: IR-DRO / MidRanking sample-reweighted LM loss on fused Triton kernels."""

from .lce import linear_cross_entropy
from .loss import HardFocusLoss, HardFocusStats, hardfocus_loss
from .weighting import METHODS, sequence_weights

__all__ = [
    "hardfocus_loss",
    "HardFocusLoss",
    "HardFocusStats",
    "linear_cross_entropy",
    "sequence_weights",
    "METHODS",
]
__version__ = "0.1.0"
