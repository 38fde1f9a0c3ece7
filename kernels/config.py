"""Block sizes and launch settings for the kernels, chosen per problem shape."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


def interpreter_active() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch parameters shared by the forward and backward kernels.

    ``block_n`` tokens x ``block_v`` vocabulary entries form one logit tile; the hidden
    dimension is reduced ``block_h`` at a time.  ``fp32_precision`` is the ``tl.dot``
    input precision used for fp32 inputs: ``"ieee"`` (exact fp32, the default, because
    accuracy against an fp64 reference is part of what we promise) or ``"tf32"``.
    ``weight_grad_chunk_bytes`` caps the fp32 accumulator of a half-precision head's
    weight gradient in the (default, atomic) backward: the vocabulary is processed in
    chunks of that many bytes of fp32 rows (at least one ``block_v`` tile), each rounded
    into the gradient once done, instead of one fp32 copy of the whole gradient.
    """

    block_n: int = 64
    block_v: int = 128
    block_h: int = 64
    num_warps: int = 8
    num_stages: int = 3
    fp32_precision: str = "ieee"
    # Forward only: vocabulary splits per token block; 0 = choose from the device size.
    vocab_splits: int = 0
    weight_grad_chunk_bytes: int = 256 * 2**20

    def __post_init__(self) -> None:
        for name in ("block_n", "block_v", "block_h"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"KernelConfig.{name} must be a power of two >= 16, got {value}")
        if self.vocab_splits < 0:
            raise ValueError(f"KernelConfig.vocab_splits must be >= 0, got {self.vocab_splits}")
        if self.weight_grad_chunk_bytes <= 0:
            raise ValueError(f"KernelConfig.weight_grad_chunk_bytes must be positive, got "
                             f"{self.weight_grad_chunk_bytes}")
        if self.fp32_precision not in ("ieee", "tf32", "tf32x3"):
            raise ValueError(f"KernelConfig.fp32_precision must be 'ieee', 'tf32' or 'tf32x3', "
                             f"got {self.fp32_precision!r}")

    def launch_options(self) -> dict:
        """Keyword arguments for a kernel launch (ignored by the interpreter)."""
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}


def default_config(n_tokens: int, n_vocab: int, n_hidden: int, dtype: torch.dtype) -> KernelConfig:
    """The configuration used when the caller passes none.

    Under the interpreter every program is executed in Python, so large tiles (few
    programs) are what keeps tests fast.  On a GPU fp32 tiles are kept smaller so that
    they fit in shared memory at the given pipeline depth.
    """
    if interpreter_active():
        return KernelConfig(block_n=32, block_v=64, block_h=64, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return KernelConfig(block_n=64, block_v=64, block_h=32, num_warps=4, num_stages=2)
    return KernelConfig(block_n=64, block_v=128, block_h=64, num_warps=8, num_stages=3)
