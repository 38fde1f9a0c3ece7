"""What every launcher works on: one ``HeadProblem`` (the head, the tokens, their
targets and the kernel configuration), and the compile-time constants the kernels are
specialised on (dtypes, flags, block sizes)."""

from __future__ import annotations

import dataclasses

import torch
import triton.language as tl

from .config import KernelConfig, interpreter_active

_TRITON_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def triton_dtype(dtype: torch.dtype):
    """The ``tl`` dtype the matmuls run in for a torch compute dtype."""
    try:
        return _TRITON_DTYPES[dtype]
    except KeyError:
        raise TypeError(f"the Triton kernels support float32, bfloat16 and float16, not {dtype}") from None


def dot_options(dtype: torch.dtype, config: KernelConfig) -> dict:
    """Compile-time constants that fix how the kernels' matmuls run for ``dtype``.

    ``DOT_PRECISION`` matters for fp32 only (see ``KernelConfig.fp32_precision``);
    ``DOT_UPCAST`` works around the interpreter's bfloat16 matmul (see ``tiles.mma``).
    """
    return {
        "COMPUTE_DTYPE": triton_dtype(dtype),
        "DOT_PRECISION": config.fp32_precision if dtype == torch.float32 else "ieee",
        "DOT_UPCAST": interpreter_active() and dtype == torch.bfloat16,
    }


def tile_constants(has_bias: bool, has_softcap: bool, compute_dtype, config: KernelConfig) -> dict:
    """Compile-time constants every kernel built on ``tiles.logit_tile`` is specialised on."""
    return dict(
        HAS_BIAS=has_bias,
        HAS_SOFTCAP=has_softcap,
        **dot_options(compute_dtype, config),
        BLOCK_N=config.block_n,
        BLOCK_V=config.block_v,
        BLOCK_H=config.block_h,
    )


@dataclasses.dataclass(frozen=True, eq=False)  # fields are tensors: compare by identity
class HeadProblem:
    """One head and its tokens, as every launcher takes them.

    ``hidden`` is (N, H), ``weight`` (V, H), ``bias`` (V,) or None, ``targets`` (N,)
    int64.  ``order`` (N,) int32 is a permutation of the tokens with the ``n_active``
    tokens the launch works on first; ``n_active`` is a 1-element int32 device tensor (no
    host synchronisation).  ``compute_dtype`` is the dtype the matmuls run in.
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    targets: torch.Tensor
    order: torch.Tensor
    n_active: torch.Tensor
    softcap: float | None
    compute_dtype: torch.dtype
    config: KernelConfig
    # The extra loss terms (``hardfocus_fused.op.loss_terms``): class weights (V,) fp32 or None;
    # the forward sums ``class_weight . z`` (or ``sum z``) per token for label smoothing
    # (``smooth``), finds each token's argmax (``argmax``) and its softmax's entropy
    # (``entropy``); the backward's coefficients are (N, 3) ``(a, e, u)`` (``rich_coef``),
    # or (N, 5) ``(a, e, u, k, mu)`` with an entropy gradient (``rich_coef`` and
    # ``entropy``), instead of (N,).
    class_weight: torch.Tensor | None = None
    smooth: bool = False
    argmax: bool = False
    rich_coef: bool = False
    entropy: bool = False

    @property
    def n_tokens(self) -> int:
        return self.hidden.shape[0]

    @property
    def n_vocab(self) -> int:
        return self.weight.shape[0]

    @property
    def n_hidden(self) -> int:
        return self.hidden.shape[1]

    def inputs(self) -> tuple:
        """``(hidden, weight, bias, class_weight, targets, order, n_active)``, the first
        arguments of every kernel (``hidden`` stands in for a missing bias or class weight;
        ``HAS_BIAS`` / ``CLASS_WEIGHT`` are then False)."""
        bias = self.bias if self.bias is not None else self.hidden
        class_weight = self.class_weight if self.class_weight is not None else self.hidden
        return (self.hidden, self.weight, bias, class_weight, self.targets, self.order, self.n_active)

    def layout(self) -> tuple:
        """``(stride_hn, stride_hh, stride_wv, stride_wh, softcap)``, the arguments every
        kernel built on ``tiles.logit_tile`` takes after its sizes (softcap 1.0 when unused)."""
        softcap = float(self.softcap) if self.softcap is not None else 1.0
        return (*self.hidden.stride(), *self.weight.stride(), softcap)

    def constants(self, **flags: bool) -> dict:
        """The compile-time constants of ``tile_constants``, plus ``flags``."""
        return dict(
            tile_constants(self.bias is not None, self.softcap is not None, self.compute_dtype, self.config), **flags
        )

    def forward_terms(self) -> dict:
        """The forward kernel's constants for the extra loss terms."""
        return dict(
            SMOOTH=self.smooth, ARGMAX=self.argmax, CLASS_WEIGHT=self.class_weight is not None, ENTROPY=self.entropy
        )

    def backward_terms(self) -> dict:
        """The backward kernels' constants for the extra loss terms (``tiles.dlogit_tile``)."""
        return dict(
            RICH_COEF=self.rich_coef,
            CLASS_WEIGHT=self.class_weight is not None,
            ENTROPY=self.rich_coef and self.entropy,
        )

    def launch_options(self) -> dict:
        return self.config.launch_options()
