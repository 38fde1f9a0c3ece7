"""What every launcher passes its kernel: the compile-time constants the kernels are
specialised on (dtypes, flags, block sizes) and the head's layout arguments."""

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
    return dict(HAS_BIAS=has_bias, HAS_SOFTCAP=has_softcap, **dot_options(compute_dtype, config),
                BLOCK_N=config.block_n, BLOCK_V=config.block_v, BLOCK_H=config.block_h)


def layout_args(hidden: torch.Tensor, weight: torch.Tensor, softcap: float | None) -> tuple:
    """``(stride_hn, stride_hh, stride_wv, stride_wh, softcap)``, the arguments every kernel
    built on ``tiles.logit_tile`` takes after its sizes (softcap 1.0 when unused)."""
    return (hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            float(softcap) if softcap is not None else 1.0)
