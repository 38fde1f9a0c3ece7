"""Calling the fused op: which implementation and backward strategy run, and the
per-token terms of ``hidden @ weight.T`` (``token_terms``) or the three-product weighted
sum (``weighted_sum``) through the op registered in :mod:`.registration`."""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..options import FORWARD_ONLY_WHEN_KNOWN, Execution
from ..tokens import compute_dtype
from . import registration
from .loss_terms import PLAIN, LossTerms


def triton_available() -> bool:
    """True when the ``triton`` package imports."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_impl(impl: str, device: torch.device, dtype: torch.dtype) -> str:
    """``"triton"`` or ``"torch"`` for ``impl`` in ``("auto", "triton", "torch")``."""
    if impl == "torch":
        return "torch"
    if impl == "auto":
        usable = device.type == "cuda" and dtype != torch.float64 and triton_available()
        return "triton" if usable else "torch"
    from ..kernels.config import interpreter_active

    if not triton_available():
        raise ValueError("impl='triton' needs the triton package; install it or use impl='torch'")
    if device.type != "cuda" and not interpreter_active():
        raise ValueError(
            f"impl='triton' needs CUDA tensors (got {device}); set TRITON_INTERPRET=1 before "
            f"importing triton to run the kernels on the CPU, or use impl='torch'"
        )
    if dtype == torch.float64:
        raise TypeError("impl='triton' supports float32, bfloat16 and float16 inputs, not float64; use impl='torch'")
    return "triton"


# A measured backward strategy in force for "auto" (``benchmarks.tuned.apply``), or None.
_measured_backward: str | None = None


def use_measured_backward(strategy: str | None) -> str | None:
    """Make ``backward_impl="auto"`` mean ``strategy`` from now on (None: the cost
    model's choice again); returns the one it replaces, to restore."""
    global _measured_backward
    previous, _measured_backward = _measured_backward, strategy
    return previous


def resolve_backward(backward_impl: str) -> str:
    """The backward strategy the op is given for ``backward_impl`` (``"auto"`` is decided
    in the backward, where the device, the shape and whether the head is trainable are
    known: ``triton_path._auto_strategy``), unless a measured choice is in force
    (:func:`use_measured_backward`).

    ``"fused"`` recomputes logit tiles in the Triton backward kernel and multiplies them
    into both gradients there: no logits leave the chip, no host synchronisation, but
    every tile's partial gradients are added with fp32 reductions through L2.
    ``"matmul"`` runs the three products as library matmuls (cuBLAS) over budgeted
    vocabulary chunks, at the cost of one round trip of each chunk's logits through memory
    and one host synchronisation.  ``"auto"`` takes the one ``hardfocus_fused.kernels.cost_model``
    predicts faster on the device: ``"matmul"`` at the benchmark heads on H100, A100 and
    L4 (a model, not a measurement: ``benchmarks/results/cost-model-*.md``), ``"fused"``
    in the interpreter and with ``deterministic=True``.
    """
    if backward_impl == "auto" and _measured_backward is not None:
        return _measured_backward
    return backward_impl


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


# Under torch.compile with dynamic shapes the token count is symbolic; the three-product
# choice is then made for this many tokens (it depends on the head far more than on N).
_SYMBOLIC_TOKENS = 16384


def wants_forward_gradients(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, run: Execution, autocast: torch.dtype | None
) -> tuple[bool, bool, bool] | None:
    """The gradients ``(hidden, weight, bias)`` the three-product path should form in the
    forward for a loss whose per-token weights are known up front, or None to take the
    four-product path: none is needed; not the Triton path; ``run.backward_impl`` is
    ``"fused"``/``"matmul"``; or it is ``"auto"`` and deterministic, or
    ``cost_model.choose_forward_gradients`` says no (always off a GPU)."""
    needs = tuple(torch.is_grad_enabled() and t is not None and t.requires_grad for t in (hidden, weight, bias))
    if not any(needs) or run.backward_impl in ("fused", "matmul") or hidden.shape[0] == 0:
        return None
    if resolve_impl(run.impl, hidden.device, hidden.dtype) != "triton":
        return None
    if run.backward_impl == "forward":
        return needs
    if resolve_deterministic(run.deterministic) or resolve_backward("auto") != "auto":
        return None  # reproducible kernels asked for, or a measured choice in force (benchmarks.tuned)
    from ..kernels.config import device_capability, device_memory_bytes, device_sm_count
    from ..kernels.cost_model import choose_forward_gradients

    n = hidden.shape[0] if isinstance(hidden.shape[0], int) else _SYMBOLIC_TOKENS
    dtype = compute_dtype(hidden, weight, autocast)
    fits = choose_forward_gradients(
        n,
        hidden.shape[1],
        weight.shape[0],
        dtype.itemsize,
        device_capability(hidden.device),
        device_sm_count(hidden.device),
        needs[1],
        device_memory_bytes(hidden.device),
    )
    return needs if fits else None


def weighted_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_weight: torch.Tensor,
    bias: torch.Tensor | None,
    ignore_index: int,
    softcap: float | None,
    needs: tuple[bool, bool, bool],
    terms: LossTerms = PLAIN,
    kernel_config=None,
    check_name: str = "",
    autocast: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum_t token_weight[t] * loss_t, per-token loss)`` by the three-product path
    (``op.forward_gradients``), for 2-D ``hidden`` and checked inputs: the sum is
    differentiable (its gradients were formed in the forward), the per-token loss is not."""
    targets = targets.to(torch.int64).contiguous()
    loss, token_loss, *_ = registration.weighted_terms(
        hidden,
        weight,
        bias,
        targets,
        terms.class_weight,
        token_weight.float().contiguous(),
        ignore_index,
        softcap,
        terms.label_smoothing,
        terms.lse_square_scale,
        autocast,
        registration.config_index(kernel_config),
        check_name,
        *needs,
    )
    return loss, token_loss


class TokenTerms(NamedTuple):
    """Per-token outputs of :func:`token_terms`, each (N,)."""

    loss: torch.Tensor
    lse: torch.Tensor
    argmax: torch.Tensor | None = None
    entropy: torch.Tensor | None = None


def token_terms(
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
    terms: LossTerms = PLAIN,
    argmax: bool = False,
    check_name: str = "",
    entropy: bool = False,
    shard=None,
) -> TokenTerms:
    """Per-token :class:`TokenTerms` ``(loss, lse, argmax, entropy)`` (N,) for 2-D ``hidden``
    and 1-D ``targets`` of already-checked inputs: the loss of ``terms`` (plain
    cross-entropy by default) and the log-sum-exp, both differentiable and 0 where not
    scored, the argmax (-1 where not scored; None unless ``argmax``) and the softmax's
    entropy (differentiable, 0 where not scored; None unless ``entropy``).

    ``check_name`` (not empty) makes the op check the targets' values under that name
    (``input_checks.deferred_label_check``).  Under autocast the op keeps its own dtype rules
    instead of autocast's: the Triton path
    multiplies in the autocast dtype when it is lower than the inputs' (as autocast's
    ``lm_head`` would, without a cast copy of the weight), the torch path in fp32 as
    always; the loss is fp32 and each gradient has its input's dtype either way.

    ``shard`` (a ``vocab_parallel.VocabShard``): ``weight`` and ``bias`` are this rank's
    block of a head sharded over the vocabulary, ``targets`` global ids; the loss and
    log-sum-exp are over the whole vocabulary (``vocab_parallel.sharded_token_terms``).
    """
    if backward_impl == "forward":
        raise ValueError(FORWARD_ONLY_WHEN_KNOWN)
    which = resolve_impl(impl, hidden.device, hidden.dtype)
    if hidden.shape[0] == 0:  # no token: nothing to launch
        which = "torch"
    targets = targets.to(torch.int64).contiguous()
    autocast = autocast_dtype(hidden.device.type) if which == "triton" else None
    if shard is not None:
        from .vocab_parallel import sharded_token_terms

        return TokenTerms(
            *sharded_token_terms(
                hidden,
                weight,
                targets,
                bias,
                ignore_index,
                softcap,
                shard,
                which,
                resolve_deterministic(deterministic),
                resolve_backward(backward_impl),
                autocast,
                terms.lse_square_scale,
                argmax,
                entropy,
            )
        )
    loss, lse, best, ent, _ = registration.token_terms(
        hidden,
        weight,
        bias,
        targets,
        terms.class_weight,
        ignore_index,
        softcap,
        terms.label_smoothing,
        terms.lse_square_scale,
        argmax,
        entropy,
        which,
        resolve_deterministic(deterministic),
        resolve_backward(backward_impl),
        autocast,
        registration.config_index(kernel_config),
        check_name,
    )
    return TokenTerms(loss, lse, best if argmax else None, ent if entropy else None)


def token_nll(
    hidden,
    weight,
    targets,
    bias,
    ignore_index,
    softcap,
    impl,
    deterministic=None,
    kernel_config=None,
    backward_impl="auto",
) -> torch.Tensor:
    """Per-token NLL (N,): ``token_terms``' loss for plain cross-entropy."""
    return token_terms(
        hidden, weight, targets, bias, ignore_index, softcap, impl, deterministic, kernel_config, backward_impl
    ).loss


def plain_backward(backward_impl: str) -> str:
    """The backward strategy of the plain (four-product) path: ``"forward"`` there means
    nothing was left to form in the forward (no gradient needed, or the torch path)."""
    return "auto" if backward_impl == "forward" else backward_impl
