"""The low-level fused op: per-token cross-entropy of ``hidden @ weight.T`` without logits."""

from __future__ import annotations

import torch

from typing import NamedTuple

from . import _validation as check
from ._tokens import compute_dtype, shift_targets
from .ce_terms import LossTerms
from . import fused_op


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
    """The backward strategy the op is given for ``backward_impl`` (``"auto"`` is decided
    in the backward, where the device, the shape and whether the head is trainable are
    known: ``triton_op._auto_strategy``; ``benchmarks.tuned`` replaces this function to
    make a measured choice instead).

    ``"fused"`` recomputes logit tiles in the Triton backward kernel and multiplies them
    into both gradients there: no logits leave the chip, no host synchronisation, but
    every tile's partial gradients are added with fp32 reductions through L2.
    ``"matmul"`` runs the three products as library matmuls (cuBLAS) over budgeted
    vocabulary chunks, at the cost of one round trip of each chunk's logits through memory
    and one host synchronisation.  ``"auto"`` takes the one ``hardfocus_fused.cost_model``
    predicts faster on the device: ``"matmul"`` at the benchmark heads on H100, A100 and
    L4 (a model, not a measurement: ``benchmarks/results/cost-model-*.md``), ``"fused"``
    in the interpreter and with ``deterministic=True``.
    """
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


FORWARD_ONLY_WHEN_KNOWN = (
    "backward_impl='forward' forms the gradients in the forward pass, which needs every token's weight in the "
    "loss before it: linear_cross_entropy with reduction='mean' or 'sum' (and no return_* option), or "
    "hardfocus_loss with method='mean' or 'uniform'; per-token losses, IR-DRO and the rankings need "
    "backward_impl='auto', 'fused' or 'matmul'")

# Under torch.compile with dynamic shapes the token count is symbolic; the three-product
# choice is then made for this many tokens (it depends on the head far more than on N).
_SYMBOLIC_TOKENS = 16384


def wants_forward_gradients(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, impl: str,
                            deterministic: bool | None, backward_impl: str,
                            autocast: torch.dtype | None) -> tuple[bool, bool, bool] | None:
    """The gradients ``(hidden, weight, bias)`` the three-product path should form in the
    forward for a loss whose per-token weights are known up front, or None to take the
    four-product path: none is needed; not the Triton path; ``backward_impl`` is
    ``"fused"``/``"matmul"``; or it is ``"auto"`` and ``deterministic``, or
    ``cost_model.choose_forward_gradients`` says no (always off a GPU)."""
    needs = tuple(torch.is_grad_enabled() and t is not None and t.requires_grad for t in (hidden, weight, bias))
    if not any(needs) or backward_impl in ("fused", "matmul") or hidden.shape[0] == 0:
        return None
    if resolve_impl(impl, hidden.device, hidden.dtype) != "triton":
        return None
    if backward_impl == "forward":
        return needs
    if resolve_deterministic(deterministic) or resolve_backward("auto") != "auto":
        return None      # reproducible kernels asked for, or a measured choice in force (benchmarks.tuned)
    from .cost_model import choose_forward_gradients
    from .kernels.config import device_capability, device_memory_bytes, device_sm_count

    n = hidden.shape[0] if isinstance(hidden.shape[0], int) else _SYMBOLIC_TOKENS
    dtype = compute_dtype(hidden, weight, autocast)
    fits = choose_forward_gradients(n, hidden.shape[1], weight.shape[0], dtype.itemsize,
                                    device_capability(hidden.device), device_sm_count(hidden.device), needs[1],
                                    device_memory_bytes(hidden.device))
    return needs if fits else None


def weighted_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, token_weight: torch.Tensor,
                 bias: torch.Tensor | None, ignore_index: int, softcap: float | None, needs: tuple[bool, bool, bool],
                 terms: LossTerms = LossTerms(), kernel_config=None, check_name: str = "",
                 autocast: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum_t token_weight[t] * loss_t, per-token loss)`` by the three-product path
    (``triton_forward_grad``), for 2-D ``hidden`` and checked inputs: the sum is
    differentiable (its gradients were formed in the forward), the per-token loss is not."""
    targets = targets.to(torch.int64).contiguous()
    loss, token_loss, *_ = fused_op.weighted_terms(
        hidden, weight, bias, targets, terms.class_weight, token_weight.float().contiguous(), ignore_index, softcap,
        terms.label_smoothing, terms.lse_square_scale, autocast, fused_op.config_index(kernel_config), check_name,
        *needs)
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
    terms: LossTerms = LossTerms(),
    argmax: bool = False,
    check_name: str = "",
    entropy: bool = False,
) -> TokenTerms:
    """Per-token :class:`TokenTerms` ``(loss, lse, argmax, entropy)`` (N,) for 2-D ``hidden``
    and 1-D ``targets`` of already-checked inputs: the loss of ``terms`` (plain
    cross-entropy by default) and the log-sum-exp, both differentiable and 0 where not
    scored, the argmax (-1 where not scored; None unless ``argmax``) and the softmax's
    entropy (differentiable, 0 where not scored; None unless ``entropy``).

    ``check_name`` (not empty) makes the op check the targets' values under that name
    (``_validation.deferred_label_check``).  Under autocast the op keeps its own dtype rules
    instead of autocast's: the Triton path
    multiplies in the autocast dtype when it is lower than the inputs' (as autocast's
    ``lm_head`` would, without a cast copy of the weight), the torch path in fp32 as
    always; the loss is fp32 and each gradient has its input's dtype either way.
    """
    check.check_choice("backward_impl", backward_impl, check.BACKWARD_IMPLS)
    if backward_impl == "forward":
        raise ValueError(FORWARD_ONLY_WHEN_KNOWN)
    which = resolve_impl(impl, hidden.device, hidden.dtype)
    if hidden.shape[0] == 0:     # no token: nothing to launch
        which = "torch"
    targets = targets.to(torch.int64).contiguous()
    autocast = autocast_dtype(hidden.device.type) if which == "triton" else None
    loss, lse, best, ent, _ = fused_op.token_terms(
        hidden, weight, bias, targets, terms.class_weight, ignore_index, softcap, terms.label_smoothing,
        terms.lse_square_scale, argmax, entropy, which, resolve_deterministic(deterministic),
        resolve_backward(backward_impl), autocast, fused_op.config_index(kernel_config), check_name)
    return TokenTerms(loss, lse, best if argmax else None, ent if entropy else None)


def token_nll(hidden, weight, targets, bias, ignore_index, softcap, impl, deterministic=None, kernel_config=None,
              backward_impl="auto") -> torch.Tensor:
    """Per-token NLL (N,): ``token_terms``' loss for plain cross-entropy."""
    return token_terms(hidden, weight, targets, bias, ignore_index, softcap, impl, deterministic, kernel_config,
                       backward_impl).loss


class LCEOutput(NamedTuple):
    """What :func:`linear_cross_entropy` returns when any ``return_*`` option is set
    (fields not asked for are None)."""

    loss: torch.Tensor
    lse: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    token_accuracy: torch.Tensor | None = None
    predicted_tokens: torch.Tensor | None = None
    entropy: torch.Tensor | None = None


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
    label_smoothing: float = 0.0,
    class_weight: torch.Tensor | None = None,
    lse_square_scale: float = 0.0,
    return_lse: bool = False,
    return_z_loss: bool = False,
    return_token_accuracy: bool = False,
    return_predicted_tokens: bool = False,
    return_entropy: bool = False,
    temperature: float = 1.0,
    impl: str = "auto",
    validate: bool = True,
    deterministic: bool | None = None,
    backward_impl: str = "auto",
) -> torch.Tensor | LCEOutput:
    """Cross-entropy of ``softcap(hidden @ weight.T + bias) / temperature`` against
    ``targets``, fused.

    With ``reduction="none"`` the loss is minus each target's log-probability, so
    ``-loss`` is the per-token log-prob with its gradient (what policy-gradient losses are
    built on; see ``hardfocus_fused.rl``).

    Args:
        hidden: (..., H) float32/bfloat16/float16 (float64 on ``impl="torch"``).
        weight: (V, H) classifier (lm_head) weight.
        targets: (...) integer class ids, ``ignore_index`` for positions to skip.
        bias: optional (V,) bias.
        ignore_index: target value that is skipped (loss 0, no gradient); as in PyTorch it
            may be any integer, a vocabulary id included.
        softcap: if set, logits are ``softcap * tanh(logits / softcap)`` (Gemma-2).
        shift: if True (or 1), position t is scored against ``targets[..., t + 1]``
            (causal-LM labels) and the last position has no target; an integer ``k >= 0``
            scores position t against ``targets[..., t + k]`` (the last k have none).
        reduction: ``"none"`` returns the fp32 per-token loss with the shape of ``targets``
            (0 at ignored positions); ``"sum"``; ``"mean"`` over non-ignored positions, or
            with ``class_weight`` divided by the class weights of their targets, as
            PyTorch does (0.0, not NaN, when there are none); the z-loss part is always
            divided by the count of non-ignored positions (Liger's definition: class
            weights weigh the cross-entropy, not the z-loss).
        label_smoothing: as ``F.cross_entropy``'s: the loss is ``(1 - eps)`` times the
            cross-entropy plus ``eps`` times the cross-entropy against the uniform
            distribution (with ``class_weight``, weighted as PyTorch weighs it).
        class_weight: (V,) weight of each class, as ``F.cross_entropy``'s ``weight``
            (Liger's ``ce_weight``): each token's loss is multiplied by its target's weight.
        lse_square_scale: z-loss coefficient ``s`` (Liger's): ``s * lse^2`` is added to
            each scored token's loss, unweighted by ``class_weight``.
        return_lse: also return the per-token log-sum-exp (shape of ``targets``, fp32, 0
            where not scored; differentiable: a loss built on it, such as a z-loss of your
            own, backpropagates through the fused kernels).
        return_z_loss: also return the z-loss part of the loss, reduced as in the loss
            (not differentiable: for logging).
        return_token_accuracy: also return whether each scored token's largest logit is
            its target: per token (1.0 / 0.0, 0 where not scored) for ``"none"``, their
            count for ``"sum"``, their fraction for ``"mean"``.  Computed in the forward's
            pass over the vocabulary, no logits kept.
        return_predicted_tokens: also return each position's argmax (int64, the first
            maximum; -1 where not scored), shaped like ``targets``.
        return_entropy: also return the entropy of each position's softmax (shape of
            ``targets``, fp32, 0 where not scored), differentiable: its gradient
            ``-p (log p + H)`` is applied inside the backward's tiles, no logits kept.
        temperature: the logits are divided by it (after the soft-capping), as samplers
            do; every output (loss, lse, entropy, argmax) is of the tempered softmax.  Done
            by dividing the hidden states, bias and cap by it: one (tokens x H) copy of the
            hidden states when it is not 1, nothing in the kernels.
        impl: ``"triton"``, ``"torch"`` or ``"auto"`` (Triton for CUDA tensors).
        validate: check that every target is in ``[0, V)`` or ``ignore_index`` (one host
            synchronisation on GPU). ``False`` skips it; an out-of-range target then gives
            an undefined loss.
        deterministic: bitwise-reproducible gradients on the same device (the Triton
            backward then runs without atomics, at the cost of one more logit recompute).
            ``None`` follows ``torch.are_deterministic_algorithms_enabled()``.  The torch
            path is always deterministic.
        backward_impl: the Triton path's backward: ``"fused"`` (Triton kernels),
            ``"matmul"`` (cuBLAS matmuls over budgeted vocabulary chunks, a Triton kernel
            for the elementwise part), ``"forward"`` (with ``reduction="mean"``/``"sum"``
            and no ``return_*`` option: the gradients are formed in the forward, three
            products instead of four, ``triton_forward_grad``) or ``"auto"`` (on a GPU,
            what the cost model predicts faster within 5% of the device's memory;
            ``"fused"`` off a GPU and when deterministic; see :func:`resolve_backward`).

    Returns:
        The loss; with any ``return_*`` option an :class:`LCEOutput` ``(loss, lse, z_loss,
        token_accuracy, predicted_tokens, entropy)`` whose fields not asked for are None.

    The backward accepts an arbitrary upstream gradient for each token, so any weighting
    can be built on the ``"none"`` output.  The (tokens x V) logits are never allocated,
    and options left at their defaults cost nothing (the kernels are specialised on them).
    """
    check.check_tensor("hidden", hidden, tuple(range(1, 9)))
    check.check_head(hidden, weight, bias)
    check.check_softcap(softcap)
    check.check_choice("reduction", reduction, check.REDUCTIONS)
    check.check_labels("targets", targets, hidden.shape[:-1], weight.shape[0], ignore_index, hidden.device,
                       check_values=validate)
    terms = check.check_loss_terms(label_smoothing, class_weight, lse_square_scale, weight.shape[0], weight.device)
    for name, flag in (("return_lse", return_lse), ("return_z_loss", return_z_loss),
                       ("return_token_accuracy", return_token_accuracy),
                       ("return_predicted_tokens", return_predicted_tokens), ("return_entropy", return_entropy)):
        check.check_flag(name, flag)
    temperature = check.check_temperature(temperature)
    shift = check.check_shift(shift)
    if shift:
        if targets.dim() == 0:
            raise ValueError(f"shift={shift} needs targets with a sequence dimension")
        targets = shift_targets(targets, ignore_index, shift=shift)
    flat = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1)
    if temperature != 1.0:
        # softcap(x) / T == (c / T) tanh((x / T) / (c / T)): dividing the hidden states, the
        # bias and the cap by T divides the logits by T, with no change to the kernels.
        flat = flat / temperature
        bias = bias / temperature if bias is not None else None
        softcap = softcap / temperature if softcap is not None else None
    want_argmax = return_token_accuracy or return_predicted_tokens
    known_up_front = reduction != "none" and not (return_lse or return_z_loss or want_argmax or return_entropy
                                                  or terms.separate_z_loss)
    if backward_impl == "forward" and not known_up_front:
        raise ValueError(FORWARD_ONLY_WHEN_KNOWN)
    autocast = autocast_dtype(hidden.device.type)
    needs = wants_forward_gradients(flat, weight, bias, impl, deterministic, backward_impl, autocast) \
        if known_up_front else None
    if needs is not None:
        valid = flat_targets != ignore_index
        # The per-token weights a sum or mean puts on the loss, known before the forward.
        token_weight = valid.float() if reduction == "sum" else terms.mean_weights(flat_targets, valid)
        loss, _ = weighted_sum(flat, weight, flat_targets, token_weight, bias, ignore_index, softcap, needs,
                               terms.kernel_terms(), check_name=check.deferred_label_check("targets", validate),
                               autocast=autocast)
        return loss
    if backward_impl == "forward":
        backward_impl = "auto"      # nothing to differentiate, or the torch path: the plain forward
    loss, lse, best, entropy = token_terms(
        flat, weight, flat_targets, bias, ignore_index, softcap, impl, deterministic, backward_impl=backward_impl,
        terms=terms.kernel_terms(), argmax=want_argmax, check_name=check.deferred_label_check("targets", validate),
        entropy=return_entropy)
    valid = flat_targets != ignore_index
    # With class weights and a z-loss together, the z-loss is added here from the
    # differentiable lse: a mean divides it by the token count, the rest by the class weights.
    z_apart = terms.z_loss(lse, valid) if terms.separate_z_loss else None

    def reduce(per_token: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        if reduction == "mean":
            return terms.mean(per_token, z, flat_targets, valid)
        if z is not None:
            per_token = per_token + z
        return per_token.view(targets.shape) if reduction == "none" else per_token.sum()

    out = reduce(loss, z_apart)
    if not (return_lse or return_z_loss or want_argmax or return_entropy):
        return out
    correct = (best == flat_targets) & valid if want_argmax else None
    accuracy = None
    if return_token_accuracy:
        accuracy = correct.float().view(targets.shape) if reduction == "none" else (
            correct.sum().float() if reduction == "sum" else correct.sum() / valid.sum().clamp_min(1))
    return LCEOutput(
        loss=out,
        lse=lse.view(targets.shape) if return_lse else None,
        z_loss=_reduced_z_loss(terms, lse.detach(), valid, reduction, targets.shape) if return_z_loss else None,
        token_accuracy=accuracy,
        predicted_tokens=best.view(targets.shape) if return_predicted_tokens else None,
        entropy=entropy.view(targets.shape) if return_entropy else None,
    )


def _reduced_z_loss(terms: LossTerms, lse: torch.Tensor, valid: torch.Tensor, reduction: str,
                    shape: torch.Size) -> torch.Tensor:
    """The z-loss part of the loss, reduced as it is inside the loss (a mean over the scored
    tokens' count, whatever the class weights)."""
    z = terms.z_loss(lse, valid)
    if reduction == "none":
        return z.view(shape)
    return z.sum() if reduction == "sum" else z.sum() / valid.sum().clamp_min(1)
