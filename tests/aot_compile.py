"""Compile every kernel variant for Hopper (sm_90) ahead of time, without a GPU.

Triton's interpreter accepts kernels that the GPU compiler rejects; this script runs the
real compiler (Triton IR -> PTX -> cubin with the bundled ptxas) on the configurations
the package launches by default, so such kernels fail on a CPU-only machine too.
Run without ``TRITON_INTERPRET`` (``tests/test_compile.py`` starts it in a subprocess).
"""

import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from hardfocus_fused.kernels.backward import _lce_backward_kernel
from hardfocus_fused.kernels.backward_deterministic import _grad_hidden_kernel, _grad_weight_kernel
from hardfocus_fused.kernels.config import default_config
from hardfocus_fused.kernels.forward import _lse_forward_kernel
from hardfocus_fused.kernels.types import tile_constants

POINTER_TYPES = {"targets_ptr": "*i64", "order_ptr": "*i32", "n_active_ptr": "*i32"}
HOPPER_MAX_SHARED_BYTES = 232448  # 227 KiB of shared memory per block on sm_90
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def signature(kernel, constants: dict, dtype: torch.dtype) -> dict:
    """Argument types as the launchers pass them: inputs in ``dtype``, buffers in fp32."""
    sig = {}
    for name in kernel.arg_names:
        if name in constants:
            sig[name] = "constexpr"
        elif name in ("hidden_ptr", "weight_ptr", "bias_ptr"):
            sig[name] = "*" + DTYPE_NAMES[dtype]
        elif name.endswith("_ptr"):
            sig[name] = POINTER_TYPES.get(name, "*fp32")
        else:
            sig[name] = "fp32" if name == "softcap" else "i32"
    return sig


def compile_all(capability: int = 90) -> int:
    target = GPUTarget("cuda", capability, 32)
    count = 0
    for dtype in DTYPE_NAMES:
        config = default_config(8192, 128256, 4096, dtype)
        tiles = tile_constants(True, True, dtype, config)
        variants = [(tiles, _lse_forward_kernel),
                    (tile_constants(False, False, dtype, config), _lse_forward_kernel),
                    (tiles, _grad_hidden_kernel),
                    (dict(tiles, GRAD_WEIGHT=True, GRAD_BIAS=True), _grad_weight_kernel)]
        for need_weight in (True, False):
            variants.append((dict(tiles, GRAD_HIDDEN=True, GRAD_WEIGHT=need_weight, GRAD_BIAS=True),
                             _lce_backward_kernel))
        for constants, kernel in variants:
            src = ASTSource(fn=kernel, signature=signature(kernel, constants, dtype), constexprs=constants)
            compiled = triton.compile(src, target=target, options=config.launch_options())
            name = f"{kernel.fn.__name__} {constants}"
            assert compiled.asm.get("cubin"), f"no cubin for {name}"
            assert compiled.metadata.shared <= HOPPER_MAX_SHARED_BYTES, f"{name} needs too much shared memory"
            count += 1
    return count


if __name__ == "__main__":
    print(f"compiled {compile_all(int(sys.argv[1]) if len(sys.argv) > 1 else 90)} kernel variants")
