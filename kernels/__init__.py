"""Triton kernels of hardfocus-fused (installed as ``hardfocus_fused.kernels``).

Only kernels and their launchers live here; autograd, weighting and input checks are in
``hardfocus_fused``.  Every launcher takes a ``HeadProblem``: 2-D ``hidden`` (tokens x H),
``weight`` (V x H), the targets, which tokens are active, and the ``KernelConfig``; none
allocates anything of size tokens x V.
"""

from .config import KernelConfig, default_config
from .forward import lse_forward
from .backward import lce_backward
from .types import HeadProblem

__all__ = ["HeadProblem", "KernelConfig", "default_config", "lse_forward", "lce_backward"]
