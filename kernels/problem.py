"""What every launcher works on, and what every kernel is handed.

On the host a launch starts from one ``HeadProblem``: the head, the tokens, their targets
and the kernel configuration.  The kernels take it grouped into a few named tuples (Triton
passes a ``NamedTuple`` through as one argument whose fields the kernel reads by name, and
specialises a ``None`` field as a compile-time constant):

- ``Head``: the linear head and how to read it (``hidden``, ``weight``, ``bias`` or None,
  sizes, strides, ``softcap`` or None);
- ``Labels``: what each token is scored against (``targets``, ``class_weight`` or None) and
  which tokens a launch visits (``order``, ``n_active``);
- ``Upstream``: what the backward forms ``dloss/dlogits`` from (the forward's ``stats`` and
  the per-token coefficients ``coef``);
- ``Grads``: the backward's fp32 gradient buffers, None for a gradient not asked for;
- ``Stored``: fp32 products ``hidden @ weight.T`` already in memory, for a forward that
  reads them instead of multiplying (the three-product path);
- ``Dot``: how the matmuls run (a compile-time constant: operand dtype, fp32 precision,
  the interpreter's bfloat16 work-around).

Absent inputs are None, never placeholder tensors, so each kernel is compiled without the
code for what it is not given.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

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


class Head(NamedTuple):
    """The head as the kernels read it: logits ``softcap(hidden @ weight.T + bias)``.

    ``hidden`` (n_tokens, n_hidden) and ``weight`` (n_vocab, n_hidden) with any strides;
    ``bias`` (n_vocab,) or None; ``softcap`` a float or None."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    n_tokens: int
    n_vocab: int
    n_hidden: int
    stride_hn: int
    stride_hh: int
    stride_wv: int
    stride_wh: int
    softcap: float | None


class Labels(NamedTuple):
    """What the tokens are scored against, and which tokens a launch visits.

    ``targets`` (n_tokens,) int64; ``class_weight`` (n_vocab,) fp32 or None; ``order``
    (n_tokens,) int32, a permutation of the tokens with the ``n_active`` ones a launch
    works on first; ``n_active`` a 1-element int32 tensor (read on the device: no host
    synchronisation)."""

    targets: torch.Tensor
    class_weight: torch.Tensor | None
    order: torch.Tensor
    n_active: torch.Tensor


class Upstream(NamedTuple):
    """What the backward's ``dloss/dlogits`` is formed from: ``stats`` (n_tokens, 2) fp32
    ``(lse, nll)`` from the forward, and ``coef`` the per-token coefficients, (n_tokens,)
    or (n_tokens, width) fp32 (``tiles.dlogit_tile``; the width is the kernels'
    ``COEF_WIDTH``)."""

    stats: torch.Tensor
    coef: torch.Tensor


class Grads(NamedTuple):
    """The backward's contiguous fp32 gradient buffers; None: that gradient is not needed."""

    hidden: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None


class Stored(NamedTuple):
    """fp32 products ``hidden @ weight.T`` already in memory, read instead of recomputed:
    ``logits`` (n_tokens, n_vocab) with unit column stride, rows ``stride`` apart (without
    bias or soft-cap, which the kernels apply)."""

    logits: torch.Tensor
    stride: int


class Dot(NamedTuple):
    """How the kernels' matmuls run (a compile-time constant).

    ``dtype``: the ``tl`` dtype of the operands.  ``precision``: ``tl.dot``'s input precision,
    which matters for fp32 only (see ``KernelConfig.fp32_precision``).  ``upcast``: set only
    under Triton's CPU interpreter with bfloat16 operands (see ``tiles.mma``)."""

    dtype: object
    precision: str
    upcast: bool


def dot_of(dtype: torch.dtype, config: KernelConfig) -> Dot:
    """The ``Dot`` constant for matmuls in the torch compute dtype ``dtype``."""
    return Dot(
        triton_dtype(dtype),
        config.fp32_precision if dtype == torch.float32 else "ieee",
        interpreter_active() and dtype == torch.bfloat16,
    )


def coef_width(rich: bool, entropy: bool) -> int:
    """Coefficients per token in the backward: 1 (plain cross-entropy), 3 ``(a, e, u)`` for
    the extra loss terms, 5 ``(a, e, u, k, mu)`` with an entropy gradient (``tiles.dlogit_tile``)."""
    return 3 + 2 * entropy if rich else 1


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

    def head(self) -> Head:
        """The head as the kernels take it."""
        softcap = float(self.softcap) if self.softcap is not None else None
        return Head(
            self.hidden,
            self.weight,
            self.bias,
            self.n_tokens,
            self.n_vocab,
            self.n_hidden,
            *self.hidden.stride(),
            *self.weight.stride(),
            softcap,
        )

    def labels(self) -> Labels:
        """The targets, class weights and active tokens as the kernels take them."""
        return Labels(self.targets, self.class_weight, self.order, self.n_active)

    def dot(self) -> Dot:
        """The kernels' ``DOT`` constant for this problem's compute dtype and configuration."""
        return dot_of(self.compute_dtype, self.config)

    def blocks(self) -> dict:
        """The tile's named block sizes, ``BLOCK_N``, ``BLOCK_V`` and ``BLOCK_H``."""
        return dict(BLOCK_N=self.config.block_n, BLOCK_V=self.config.block_v, BLOCK_H=self.config.block_h)

    @property
    def coef_width(self) -> int:
        """The backward kernels' ``COEF_WIDTH`` (see ``coef_width``)."""
        return coef_width(self.rich_coef, self.entropy)

    def launch_options(self) -> dict:
        return self.config.launch_options()


def launch_flags(args: tuple, kwargs: dict) -> dict[str, bool]:
    """The named compile-time choices of one kernel launch (its ``args`` and ``kwargs``),
    for reports and tests: ``HAS_BIAS`` / ``HAS_SOFTCAP`` (the ``Head``'s), ``CLASS_WEIGHT``
    (the ``Labels``'), ``GRAD_HIDDEN`` / ``GRAD_WEIGHT`` / ``GRAD_BIAS`` (the ``Grads``'),
    ``STORED_LOGITS`` (a forward given ``Stored`` logits), ``RICH_COEF`` and ``ENTROPY``
    from the backward's ``COEF_WIDTH``, and the forward's ``SMOOTH`` / ``ARGMAX`` /
    ``ENTROPY`` as launched."""
    flags: dict[str, bool] = {}
    for arg in (*args, *kwargs.values()):
        if isinstance(arg, Head):
            flags.update(HAS_BIAS=arg.bias is not None, HAS_SOFTCAP=arg.softcap is not None)
        elif isinstance(arg, Labels):
            flags["CLASS_WEIGHT"] = arg.class_weight is not None
        elif isinstance(arg, Grads):
            flags.update(GRAD_HIDDEN=arg.hidden is not None, GRAD_WEIGHT=arg.weight is not None)
            flags["GRAD_BIAS"] = arg.bias is not None
        elif isinstance(arg, Stored):
            flags["STORED_LOGITS"] = True
    for name in ("SMOOTH", "ARGMAX", "ENTROPY"):
        if name in kwargs:
            flags[name] = bool(kwargs[name])
    if "COEF_WIDTH" in kwargs:
        flags.update(RICH_COEF=kwargs["COEF_WIDTH"] > 1, ENTROPY=kwargs["COEF_WIDTH"] == 5)
    return flags
