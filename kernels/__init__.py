"""Triton kernels of hardfocus-fused (installed as ``hardfocus_fused.kernels``).

Only kernels and their launchers live here; autograd, weighting and input checks are in
``hardfocus_fused``.  Every launcher takes a ``HeadProblem``: 2-D ``hidden`` (tokens x H),
``weight`` (V x H), the targets, which tokens are active, and the ``KernelConfig``; none
allocates anything of size tokens x V (the ``"matmul"`` backward holds one budgeted chunk
of logits).
"""

from .config import BACKWARD_STRATEGIES, HeadConfigs, KernelConfig, default_config, default_configs
from .forward import lse_forward
from .backward import lce_backward
from .backward_matmul import matmul_backward
from .types import HeadProblem

__all__ = ["BACKWARD_STRATEGIES", "HeadConfigs", "HeadProblem", "KernelConfig", "default_config", "default_configs",
           "lse_forward", "lce_backward", "matmul_backward"]
