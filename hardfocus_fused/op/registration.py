"""The fused op registered with ``torch.library``: one opaque node for the compiler.

``hardfocus_fused::token_terms`` computes the per-token loss and log-sum-exp of
``hidden @ weight.T`` without logits (by the Triton kernels or the chunked torch path) and
``hardfocus_fused::token_terms_backward`` its gradients.  Both have fake (meta)
implementations, so ``torch.compile`` traces around them with the shapes alone and never
into the launchers, and the backward is registered as the forward's autograd formula.
Everything the ops need is a tensor, a number, a string or a dtype; kernel configurations
(``KernelConfig`` / ``HeadConfigs``, for tests and tuning) travel as an index into a small
registry.

Under compilation the label check (a host synchronisation) runs inside the op, where
the compiler does not see it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..input_checks import check_label_values
from . import torch_path, triton_path
from .loss_terms import LossTerms

_CONFIGS: list = [None]  # kernel configurations by index; 0: the defaults


def config_index(config) -> int:
    """The registry index of a kernel configuration (None: 0, the defaults)."""
    for index, known in enumerate(_CONFIGS):
        if known is config or (known is not None and known == config):
            return index
    _CONFIGS.append(config)
    return len(_CONFIGS) - 1


def _terms(label_smoothing: float, class_weight: Tensor | None, lse_square_scale: float) -> LossTerms:
    return LossTerms(label_smoothing=label_smoothing, class_weight=class_weight, lse_square_scale=lse_square_scale)


def _accumulation_dtype(hidden: Tensor, impl: str) -> torch.dtype:
    return torch.float64 if impl == "torch" and hidden.dtype == torch.float64 else torch.float32


@torch.library.custom_op("hardfocus_fused::token_terms", mutates_args=())
def token_terms(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    class_weight: Tensor | None,
    ignore_index: int,
    softcap: float | None,
    label_smoothing: float,
    lse_square_scale: float,
    argmax: bool,
    entropy: bool,
    impl: str,
    deterministic: bool,
    backward_impl: str,
    autocast: torch.dtype | None,
    config: int,
    check_name: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(loss, lse, argmax, entropy, residual)`` per token (see ``torch_path.forward`` and
    ``triton_path.forward``); ``check_name``, when not empty, checks the targets' values
    first (their name in the error)."""
    if check_name:
        check_label_values(check_name, targets, weight.shape[0], ignore_index)
    terms = _terms(label_smoothing, class_weight, lse_square_scale)
    if impl == "triton":
        return triton_path.forward(
            hidden, weight, bias, targets, ignore_index, softcap, _CONFIGS[config], autocast, terms, argmax, entropy
        )
    return torch_path.forward(hidden, weight, bias, targets, ignore_index, softcap, terms, argmax, entropy)


@token_terms.register_fake
def _(
    hidden,
    weight,
    bias,
    targets,
    class_weight,
    ignore_index,
    softcap,
    label_smoothing,
    lse_square_scale,
    argmax,
    entropy,
    impl,
    deterministic,
    backward_impl,
    autocast,
    config,
    check_name,
):
    n, acc = hidden.shape[0], _accumulation_dtype(hidden, impl)
    return (
        hidden.new_empty(n, dtype=acc),
        hidden.new_empty(n, dtype=acc),
        hidden.new_empty(n if argmax else 0, dtype=torch.long),
        hidden.new_empty(n if entropy else 0, dtype=acc),
        hidden.new_empty((n, 2), dtype=acc),
    )


@torch.library.custom_op("hardfocus_fused::token_terms_backward", mutates_args=())
def token_terms_backward(
    grad_loss: Tensor | None,
    grad_lse: Tensor | None,
    grad_entropy: Tensor | None,
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    class_weight: Tensor | None,
    residual: Tensor,
    entropy: Tensor,
    ignore_index: int,
    softcap: float | None,
    label_smoothing: float,
    lse_square_scale: float,
    impl: str,
    deterministic: bool,
    backward_impl: str,
    autocast: torch.dtype | None,
    config: int,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``hidden``, ``weight`` and ``bias`` (an empty tensor where not needed)."""
    terms = _terms(label_smoothing, class_weight, lse_square_scale)
    needs = (need_hidden, need_weight, need_bias)
    # The arguments both paths take, in their order.
    common = (grad_loss, grad_lse, hidden, weight, bias, targets, residual, ignore_index, softcap, terms, needs)
    if impl == "triton":
        grads = triton_path.backward(
            *common,
            deterministic=deterministic,
            strategy=backward_impl,
            config=_CONFIGS[config],
            autocast=autocast,
            grad_entropy=grad_entropy,
            entropy=entropy,
        )
    else:
        grads = torch_path.backward(*common, grad_entropy=grad_entropy, entropy=entropy)
    return tuple(g if g is not None else hidden.new_empty(0) for g in grads)


@token_terms_backward.register_fake
def _(
    grad_loss,
    grad_lse,
    grad_entropy,
    hidden,
    weight,
    bias,
    targets,
    class_weight,
    residual,
    entropy,
    ignore_index,
    softcap,
    label_smoothing,
    lse_square_scale,
    impl,
    deterministic,
    backward_impl,
    autocast,
    config,
    need_hidden,
    need_weight,
    need_bias,
):
    like = lambda tensor, needed: torch.empty_like(tensor) if needed else hidden.new_empty(0)  # noqa: E731
    return (
        like(hidden, need_hidden),
        like(weight, need_weight),
        like(bias, need_bias) if bias is not None else hidden.new_empty(0),
    )


# Positions of the differentiable inputs and of the options, in token_terms' signature.
_OPTIONS = (
    "ignore_index",
    "softcap",
    "label_smoothing",
    "lse_square_scale",
    "argmax",
    "entropy",
    "impl",
    "deterministic",
    "backward_impl",
    "autocast",
    "config",
    "check_name",
)


def _setup_context(ctx, inputs, output) -> None:
    hidden, weight, bias, targets, class_weight = inputs[:5]
    ctx.options = dict(zip(_OPTIONS, inputs[5:]))
    ctx.save_for_backward(hidden, weight, bias, targets, class_weight, output[4], output[3])
    ctx.set_materialize_grads(False)  # an unused lse or entropy keeps the plainer backward kernels


def _backward(ctx, grad_loss, grad_lse, _grad_argmax, grad_entropy, _grad_residual):
    hidden, weight, bias, targets, class_weight, residual, entropy = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    if grad_loss is None and grad_lse is None and grad_entropy is None or not (need_h or need_w or need_b):
        return (None,) * (5 + len(_OPTIONS))
    o = ctx.options
    grads = token_terms_backward(
        grad_loss,
        grad_lse,
        grad_entropy,
        hidden,
        weight,
        bias,
        targets,
        class_weight,
        residual,
        entropy,
        o["ignore_index"],
        o["softcap"],
        o["label_smoothing"],
        o["lse_square_scale"],
        o["impl"],
        o["deterministic"],
        o["backward_impl"],
        o["autocast"],
        o["config"],
        need_h,
        need_w,
        need_b and bias is not None,
    )
    grad_h, grad_w, grad_b = (g if need else None for g, need in zip(grads, (need_h, need_w, need_b)))
    return (grad_h, grad_w, grad_b) + (None,) * (2 + len(_OPTIONS))


token_terms.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("hardfocus_fused::weighted_terms", mutates_args=())
def weighted_terms(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    class_weight: Tensor | None,
    token_weight: Tensor,
    ignore_index: int,
    softcap: float | None,
    label_smoothing: float,
    lse_square_scale: float,
    autocast: torch.dtype | None,
    config: int,
    check_name: str,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(loss, token_loss, grad_hidden, grad_weight, grad_bias)`` of the three-product path
    (``op.forward_gradients``): the scalar ``sum_t token_weight[t] * loss_t``, the per-token
    loss, and the scalar's gradients formed in the forward (empty where not needed)."""
    if check_name:
        check_label_values(check_name, targets, weight.shape[0], ignore_index)
    from .forward_gradients import forward_with_gradients

    out = forward_with_gradients(
        hidden,
        weight,
        bias,
        targets,
        token_weight,
        ignore_index,
        softcap,
        _terms(label_smoothing, class_weight, lse_square_scale),
        (need_hidden, need_weight, need_bias),
        _CONFIGS[config],
        autocast,
    )
    return tuple(t if t is not None else hidden.new_empty(0) for t in out)


@weighted_terms.register_fake
def _(
    hidden,
    weight,
    bias,
    targets,
    class_weight,
    token_weight,
    ignore_index,
    softcap,
    label_smoothing,
    lse_square_scale,
    autocast,
    config,
    check_name,
    need_hidden,
    need_weight,
    need_bias,
):
    like = lambda tensor, needed: torch.empty_like(tensor) if needed else hidden.new_empty(0)  # noqa: E731
    return (
        hidden.new_empty((), dtype=torch.float32),
        hidden.new_empty(hidden.shape[0], dtype=torch.float32),
        like(hidden, need_hidden),
        like(weight, need_weight),
        like(bias, need_bias) if bias is not None else hidden.new_empty(0),
    )


def _weighted_setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(output[2], output[3], output[4])
    ctx.set_materialize_grads(False)


def _weighted_backward(ctx, grad_loss, grad_token_loss, *_grads_of_gradients):
    if grad_token_loss is not None:
        raise RuntimeError(
            "the per-token loss of hardfocus_fused::weighted_terms is not differentiable (its "
            "gradients were formed in the forward for the weighted sum only); use "
            "backward_impl='fused' or 'matmul' to differentiate per-token losses"
        )
    if grad_loss is None:
        return (None,) * 16

    def scale(grad: Tensor, needed: bool, name: str) -> Tensor | None:
        if not needed:
            return None
        if grad.numel() == 0:  # the forward was told this input needs no gradient
            raise RuntimeError(
                f"hardfocus_fused::weighted_terms formed no gradient for {name} in the forward "
                f"(need_{name}=False), but autograd asks for one"
            )
        return grad * grad_loss  # a 0-dim fp32 factor: the product is rounded once, to grad's dtype

    grads = ctx.saved_tensors
    return (
        tuple(
            scale(g, need, name) for g, need, name in zip(grads, ctx.needs_input_grad[:3], ("hidden", "weight", "bias"))
        )
        + (None,) * 13
    )


weighted_terms.register_autograd(_weighted_backward, setup_context=_weighted_setup_context)
