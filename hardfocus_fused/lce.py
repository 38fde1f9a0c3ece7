"""The low-level fused op: per-token cross-entropy of ``hidden @ weight.T`` without logits."""

from __future__ import annotations

import torch

from . import _validation as check
from ._tokens import shift_targets
from .torch_op import TorchLinearCrossEntropy
from .triton_op import TritonLinearCrossEntropy


def triton_available() -> bool:
    """True when the ``triton`` package imports."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_impl(impl: str, device: torch.device, dtype: torch.dtype) -> str:
    """``"triton"`` or ``"torch"`` for ``impl`` in ``("auto", "triton", "torch")``."""
    check.check_choice("impl", impl, check.IMPLS)
    if impl == "torch":
        return "torch"
    if impl == "auto":
        usable = device.type == "cuda" and dtype != torch.float64 and triton_available()
        return "triton" if usable else "torch"
    from .kernels.config import interpreter_active

    if not triton_available():
        raise ValueError("impl='triton' needs the triton package; install it or use impl='torch'")
    if device.type != "cuda" and not interpreter_active():
        raise ValueError(f"impl='triton' needs CUDA tensors (got {device}); set TRITON_INTERPRET=1 before "
                         f"importing triton to run the kernels on the CPU, or use impl='torch'")
    if dtype == torch.float64:
        raise TypeError("impl='triton' supports float32, bfloat16 and float16 inputs, not float64; use impl='torch'")
    return "triton"


def resolve_backward(backward_impl: str) -> str:
    """The Triton backward strategy for ``backward_impl``: ``"auto"`` is ``"fused"``.

    ``"fused"`` (the default) recomputes logit tiles in the Triton backward kernel and
    multiplies them into both gradients there: no logits leave the chip, no host
    synchronisation, memory as described in the README.  ``"matmul"`` runs the three
    products as library matmuls (cuBLAS) over budgeted vocabulary chunks, fast by
    construction at the cost of one round trip of each chunk's logits through memory and
    one host synchronisation.  The fused kernel is the default because it was built and
    checked for this job (compile-level resources in ``benchmarks/results``); which is
    faster on a given GPU is for ``benchmarks.sweep`` to measure.
    """
    return "fused" if backward_impl == "auto" else backward_impl


def resolve_deterministic(deterministic: bool | None) -> bool:
    """``deterministic``, or when None whether ``torch.use_deterministic_algorithms`` is on."""
    if deterministic is None:
        return torch.are_deterministic_algorithms_enabled()
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be True, False or None, got {deterministic!r}")
    return deterministic


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast runs matmuls in on ``device_type`` right now, or None when it is off."""
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def token_nll(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    ignore_index: int,
    softcap: float | None,
    impl: str,
    deterministic: bool | None = None,
    kernel_config=None,
    backward_impl: str = "auto",
) -> torch.Tensor:
    """Per-token NLL (N,) for 2-D ``hidden`` and 1-D ``targets`` of already-checked inputs.

    Under autocast the op keeps its own dtype rules instead of autocast's: the Triton path
    multiplies in the autocast dtype when it is lower than the inputs' (as autocast's
    ``lm_head`` would, without a cast copy of the weight), the torch path in fp32 as
    always; the NLL is fp32 and each gradient has its input's dtype either way.
    """
    check.check_choice("backward_impl", backward_impl, check.BACKWARD_IMPLS)
    which = resolve_impl(impl, hidden.device, hidden.dtype)
    deterministic = resolve_deterministic(deterministic)  # the torch path always is
    targets = targets.to(torch.int64).contiguous()
    if which == "triton" and hidden.shape[0] > 0:   # no token: nothing to launch
        return TritonLinearCrossEntropy.apply(hidden, weight, bias, targets, ignore_index, softcap, deterministic,
                                              kernel_config, autocast_dtype(hidden.device.type),
                                              resolve_backward(backward_impl))
    return TorchLinearCrossEntropy.apply(hidden, weight, bias, targets, ignore_index, softcap)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    shift: bool | int = False,
    reduction: str = "none",
    impl: str = "auto",
    validate: bool = True,
    deterministic: bool | None = None,
    backward_impl: str = "auto",
) -> torch.Tensor:
    """Cross-entropy of ``softcap(hidden @ weight.T + bias)`` against ``targets``, fused.

    Args:
        hidden: (..., H) float32/bfloat16/float16 (float64 on ``impl="torch"``).
        weight: (V, H) classifier (lm_head) weight.
        targets: (...) integer class ids, ``ignore_index`` for positions to skip.
        bias: optional (V,) bias.
        ignore_index: target value that is skipped (NLL 0, no gradient); as in PyTorch it
            may be any integer, a vocabulary id included.
        softcap: if set, logits are ``softcap * tanh(logits / softcap)`` (Gemma-2).
        shift: if True (or 1), position t is scored against ``targets[..., t + 1]``
            (causal-LM labels) and the last position has no target; an integer ``k >= 0``
            scores position t against ``targets[..., t + k]`` (the last k have none).
        reduction: ``"none"`` returns the fp32 per-token NLL with the shape of ``targets``
            (0 at ignored positions); ``"sum"``; ``"mean"`` over non-ignored positions
            (0.0, not NaN, when there are none).
        impl: ``"triton"``, ``"torch"`` or ``"auto"`` (Triton for CUDA tensors).
        validate: check that every target is in ``[0, V)`` or ``ignore_index`` (one host
            synchronisation on GPU). ``False`` skips it; an out-of-range target then gives
            an undefined loss.
        deterministic: bitwise-reproducible gradients on the same device (the Triton
            backward then runs without atomics, at the cost of one more logit recompute).
            ``None`` follows ``torch.are_deterministic_algorithms_enabled()``.  The torch
            path is always deterministic.
        backward_impl: the Triton path's backward: ``"fused"`` (Triton kernels; what
            ``"auto"`` picks), or ``"matmul"`` (cuBLAS matmuls over budgeted vocabulary
            chunks, a Triton kernel for the elementwise part; see :func:`resolve_backward`).

    The backward accepts an arbitrary upstream gradient for each token, so any weighting
    can be built on the ``"none"`` output.  The (tokens x V) logits are never allocated.
    """
    check.check_tensor("hidden", hidden, tuple(range(1, 9)))
    check.check_head(hidden, weight, bias)
    check.check_softcap(softcap)
    check.check_choice("reduction", reduction, check.REDUCTIONS)
    check.check_labels("targets", targets, hidden.shape[:-1], weight.shape[0], ignore_index, hidden.device,
                       check_values=validate)
    shift = check.check_shift(shift)
    if shift:
        if targets.dim() == 0:
            raise ValueError(f"shift={shift} needs targets with a sequence dimension")
        targets = shift_targets(targets, ignore_index, shift=shift)
    flat = hidden.reshape(-1, hidden.shape[-1])
    nll = token_nll(flat, weight, targets.reshape(-1), bias, ignore_index, softcap, impl, deterministic,
                    backward_impl=backward_impl)
    if reduction == "none":
        return nll.view(targets.shape)
    if reduction == "sum":
        return nll.sum()
    return nll.sum() / (targets != ignore_index).sum().clamp_min(1)
