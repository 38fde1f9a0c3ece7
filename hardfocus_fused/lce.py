"""The low-level fused op: per-token cross-entropy of ``hidden @ weight.T`` without logits."""

from __future__ import annotations

import torch

from typing import NamedTuple

from . import _validation as check
from . import fused_op
from ._tokens import compute_dtype, shift_targets
from .ce_terms import LossTerms
from .options import FORWARD_ONLY_WHEN_KNOWN, CrossEntropy, Execution, LCEOptions


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


# Under torch.compile with dynamic shapes the token count is symbolic; the three-product
# choice is then made for this many tokens (it depends on the head far more than on N).
_SYMBOLIC_TOKENS = 16384


def wants_forward_gradients(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, run: Execution,
                            autocast: torch.dtype | None) -> tuple[bool, bool, bool] | None:
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
    options: LCEOptions | None = None,
    **keywords,
) -> torch.Tensor | LCEOutput:
    """Cross-entropy of ``softcap(hidden @ weight.T + bias) / temperature`` against
    ``targets``, fused: the (tokens x V) logits are never allocated.

    Called like ``F.cross_entropy(hidden @ weight.T, targets)`` it returns the same mean.
    With ``reduction="none"`` the loss is minus each target's log-probability, so
    ``-loss`` is the per-token log-prob with its gradient (what policy-gradient losses are
    built on; see ``hardfocus_fused.rl``); the backward accepts any per-token upstream
    gradient, so any weighting can be built on it.  Options left at their defaults cost
    nothing (the kernels are specialised on them).

    Args:
        hidden: (..., H) float32/bfloat16/float16 (float64 on ``impl="torch"``).
        weight: (V, H) classifier (lm_head) weight.
        targets: (...) integer class ids, ``ignore_index`` for positions to skip.
        bias: optional (V,) bias.
        options: an :class:`~hardfocus_fused.options.LCEOptions` (None: the defaults).
        **keywords: its fields, changing ``options``:

            - the per-token loss (:class:`~hardfocus_fused.options.CrossEntropy`):
              ``ignore_index`` (-100), ``label_smoothing`` (PyTorch's), ``class_weight``
              ((V,), PyTorch's ``weight``, Liger's ``ce_weight``), ``lse_square_scale``
              (Liger's z-loss ``s * lse^2``, unweighted by the class weights), ``softcap``
              (Gemma-2), ``temperature`` (the logits divided by it, as samplers do: one
              (tokens x H) copy of the hidden states when it is not 1);
            - ``reduction``: ``"mean"`` (default) over the scored positions, with class
              weights divided by their targets' weights as PyTorch does (0.0 when none is
              scored) and the z-loss part by their count (Liger's); ``"sum"``; ``"none"``,
              the fp32 per-token loss shaped like ``targets`` (0 where not scored);
            - ``shift``: True or ``k >= 0`` scores position t against ``targets[..., t + k]``
              (causal-LM labels: True); False (default) against ``t``;
            - extra outputs (:class:`~hardfocus_fused.options.Returns`): ``return_lse``
              (per-token log-sum-exp, differentiable), ``return_z_loss`` (reduced as in
              the loss, for logging), ``return_token_accuracy`` (per token for
              ``"none"``, their count for ``"sum"``, their fraction for ``"mean"``),
              ``return_predicted_tokens`` (each position's argmax, -1 where not scored),
              ``return_entropy`` (the softmax's entropy, differentiable);
            - how it runs (:class:`~hardfocus_fused.options.Execution`): ``impl``
              (``"auto"``: Triton for CUDA tensors; ``"triton"``, ``"torch"``),
              ``backward_impl`` (``"auto"``, ``"fused"``, ``"matmul"``, or ``"forward"``
              for a mean or sum with nothing else returned: three products instead of
              four), ``deterministic`` (bitwise-reproducible gradients; None follows
              ``torch.are_deterministic_algorithms_enabled()``), ``validate`` (check the
              targets' values: one host synchronisation on a GPU).

    Returns:
        The loss; with any ``return_*`` option an :class:`LCEOutput` ``(loss, lse, z_loss,
        token_accuracy, predicted_tokens, entropy)`` whose fields not asked for are None.

    Raises:
        ValueError, TypeError: an option, or an input, that cannot be used (named), before
            any kernel runs.
    """
    options = LCEOptions.build(options, **keywords)
    ce, returns, run = options.cross_entropy, options.returns, options.execution
    check.check_tensor("hidden", hidden, tuple(range(1, 9)))
    check.check_head(hidden, weight, bias)
    ce.check_head(weight.shape[0], weight.device)
    check.check_labels("targets", targets, hidden.shape[:-1], weight.shape[0], ce.ignore_index, hidden.device,
                       check_values=run.validate)
    terms = ce.terms()
    if options.shift:
        if targets.dim() == 0:
            raise ValueError(f"shift={options.shift} needs targets with a sequence dimension")
        targets = shift_targets(targets, ce.ignore_index, shift=options.shift)
    flat, bias, softcap = tempered(hidden.reshape(-1, hidden.shape[-1]), bias, ce)
    flat_targets = targets.reshape(-1)
    check_name = check.deferred_label_check("targets", run.validate)
    autocast = autocast_dtype(hidden.device.type)
    needs = wants_forward_gradients(flat, weight, bias, run, autocast) if options.known_up_front else None
    if needs is not None:
        valid = flat_targets != ce.ignore_index
        # The per-token weights a sum or mean puts on the loss, known before the forward.
        token_weight = valid.float() if options.reduction == "sum" else terms.mean_weights(flat_targets, valid)
        loss, _ = weighted_sum(flat, weight, flat_targets, token_weight, bias, ce.ignore_index, softcap, needs,
                               terms.kernel_terms(), check_name=check_name, autocast=autocast)
        return loss
    loss, lse, best, entropy = token_terms(
        flat, weight, flat_targets, bias, ce.ignore_index, softcap, run.impl, run.deterministic,
        backward_impl=plain_backward(run.backward_impl), terms=terms.kernel_terms(), argmax=returns.argmax,
        check_name=check_name, entropy=returns.entropy)
    valid = flat_targets != ce.ignore_index
    # With class weights and a z-loss together, the z-loss is added here from the
    # differentiable lse: a mean divides it by the token count, the rest by the class weights.
    z_apart = terms.z_loss(lse, valid) if terms.separate_z_loss else None
    reduction = options.reduction

    def reduce(per_token: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        if reduction == "mean":
            return terms.mean(per_token, z, flat_targets, valid)
        if z is not None:
            per_token = per_token + z
        return per_token.view(targets.shape) if reduction == "none" else per_token.sum()

    out = reduce(loss, z_apart)
    if not returns.any:
        return out
    correct = (best == flat_targets) & valid if returns.argmax else None
    accuracy = None
    if returns.token_accuracy:
        accuracy = correct.float().view(targets.shape) if reduction == "none" else (
            correct.sum().float() if reduction == "sum" else correct.sum() / valid.sum().clamp_min(1))
    return LCEOutput(
        loss=out,
        lse=lse.view(targets.shape) if returns.lse else None,
        z_loss=_reduced_z_loss(terms, lse.detach(), valid, reduction, targets.shape) if returns.z_loss else None,
        token_accuracy=accuracy,
        predicted_tokens=best.view(targets.shape) if returns.predicted_tokens else None,
        entropy=entropy.view(targets.shape) if returns.entropy else None,
    )


def tempered(flat: torch.Tensor, bias: torch.Tensor | None,
             ce: CrossEntropy) -> tuple[torch.Tensor, torch.Tensor | None, float | None]:
    """``(hidden, bias, softcap)`` whose logits are ``ce``'s tempered ones:
    ``softcap(x) / T == (c / T) tanh((x / T) / (c / T))``, so dividing the hidden states,
    the bias and the cap by T divides the logits by T, with no change to the kernels."""
    t = ce.temperature
    if t == 1.0:
        return flat, bias, ce.softcap
    return (flat / t, bias / t if bias is not None else None, ce.softcap / t if ce.softcap is not None else None)


def plain_backward(backward_impl: str) -> str:
    """The backward strategy of the plain (four-product) path: ``"forward"`` there means
    nothing was left to form in the forward (no gradient needed, or the torch path)."""
    return "auto" if backward_impl == "forward" else backward_impl


def _reduced_z_loss(terms: LossTerms, lse: torch.Tensor, valid: torch.Tensor, reduction: str,
                    shape: torch.Size) -> torch.Tensor:
    """The z-loss part of the loss, reduced as it is inside the loss (a mean over the scored
    tokens' count, whatever the class weights)."""
    z = terms.z_loss(lse, valid)
    if reduction == "none":
        return z.view(shape)
    return z.sum() if reduction == "sum" else z.sum() / valid.sum().clamp_min(1)
