"""Triton kernels of hardfocus-fused (installed as ``hardfocus_fused.kernels``).

Only kernels and their launchers live here; autograd, weighting and input checks are in
``hardfocus_fused``.  Every launcher works on 2-D ``hidden`` (tokens x H) and ``weight``
(V x H) and never allocates anything of size tokens x V.
"""

from .config import KernelConfig, default_config
from .forward import lse_forward
from .backward import lce_backward

__all__ = ["KernelConfig", "default_config", "lse_forward", "lce_backward"]
