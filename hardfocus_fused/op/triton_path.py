"""The Triton path's forward and backward (what ``registration`` registers for
``impl="triton"``): per-token loss of ``hidden @ weight.T`` from the kernels."""

from __future__ import annotations

import torch

from ..tokens import compute_dtype, partition_active
from .loss_terms import PLAIN, LossTerms


def _configs(hidden: torch.Tensor, weight: torch.Tensor, config, dtype: torch.dtype):
    from ..kernels import config as settings  # looked up per call: benchmarks.tuned replaces the defaults

    if config is None:  # the defaults of the device's architecture
        return settings.default_configs(
            hidden.shape[0], weight.shape[0], hidden.shape[1], dtype, settings.device_capability(hidden.device)
        )
    return settings.HeadConfigs.of(config)


def head_problem(hidden, weight, bias, targets, selected, softcap, dtype, config, terms: LossTerms, **flags):
    """The kernels' ``HeadProblem`` over the tokens where ``selected`` is True (the active
    ones, first in its order), with the class weights of ``terms`` and ``flags``
    (``smooth``, ``argmax``, ``rich_coef``, ``entropy``)."""
    from ..kernels.problem import HeadProblem

    order, n_active = partition_active(selected)
    return HeadProblem(
        hidden, weight, bias, targets, order, n_active, softcap, dtype, config, class_weight=terms.class_weight, **flags
    )


def forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    ignore_index: int,
    softcap: float | None,
    config=None,
    autocast: torch.dtype | None = None,
    terms: LossTerms = PLAIN,
    argmax: bool = False,
    entropy: bool = False,
):
    """Per-token ``(loss, lse, argmax, entropy, stats)``: the fp32 loss of ``terms`` and
    log-sum-exp (0 where not scored), the int64 argmax (-1 where not scored; empty unless
    ``argmax``), the fp32 entropy of the softmax (0 where not scored; empty unless
    ``entropy``) and the kernels' (N, 2) fp32 ``(lse, nll)`` that :func:`backward` takes.

    ``config`` is a ``KernelConfig`` (every pass) or ``HeadConfigs`` (per pass), None for
    the defaults; the matmuls run in ``compute_dtype(hidden, weight, autocast)``.
    """
    from ..kernels import forward as kernel_forward

    dtype = compute_dtype(hidden, weight, autocast)
    configs = _configs(hidden, weight, config, dtype)
    valid = targets != ignore_index
    problem = head_problem(
        hidden,
        weight,
        bias,
        targets,
        valid,
        softcap,
        dtype,
        configs.forward_for(entropy),
        terms,
        smooth=terms.smooth,
        argmax=argmax,
        entropy=entropy,
    )
    out = kernel_forward.lse_forward(problem)
    lse = torch.where(valid, out.stats[:, 0], 0.0)
    loss = terms.token_loss(lse, out.stats[:, 1], out.smooth, targets, valid, weight.shape[0])
    best = torch.where(valid, out.argmax, -1) if argmax else torch.empty(0, dtype=torch.long, device=loss.device)
    ent = torch.where(valid, out.entropy, 0.0) if entropy else lse.new_empty(0)
    return loss, lse, best, ent, out.stats


def backward(
    grad_loss: torch.Tensor | None,
    grad_lse: torch.Tensor | None,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    stats: torch.Tensor,
    ignore_index: int,
    softcap: float | None,
    terms: LossTerms,
    needs: tuple[bool, bool, bool],
    deterministic: bool = False,
    strategy: str = "fused",
    config=None,
    autocast: torch.dtype | None = None,
    grad_entropy: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
):
    """Gradients ``(hidden, weight, bias)`` (None where not in ``needs``) for per-token
    upstream gradients of the loss, of the log-sum-exp and of the entropy (None: zero;
    ``entropy``: the forward's, needed with ``grad_entropy``), by the backward
    ``strategy``: ``"fused"`` (the atomic Triton kernel, or the deterministic kernels),
    ``"matmul"`` (``kernels.backward_matmul``) or ``"auto"`` (:func:`_auto_strategy`)."""
    from ..kernels import backward_fused, backward_matmul

    dtype = compute_dtype(hidden, weight, autocast)
    configs = _configs(hidden, weight, config, dtype)
    valid = targets != ignore_index
    coef = terms.upstream_coefficients(
        grad_loss, grad_lse, grad_entropy, stats[:, 0], entropy, targets, valid, weight.shape[0]
    )
    if strategy == "auto":
        strategy = _auto_strategy(hidden, weight, dtype, needs[1], deterministic)
    kernel_config = configs.deterministic if deterministic and strategy == "fused" else configs.backward
    # Only tokens with a non-zero coefficient enter the backward.
    active = coef != 0 if coef.dim() == 1 else (coef != 0).any(dim=1)
    problem = head_problem(
        hidden,
        weight,
        bias,
        targets,
        active,
        softcap,
        dtype,
        kernel_config,
        terms,
        rich_coef=coef.dim() == 2,
        entropy=grad_entropy is not None,
    )
    need_h, need_w, need_b = needs
    coef = coef.contiguous()
    if strategy == "matmul":
        return backward_matmul.matmul_backward(
            problem, stats, coef, configs.matmul_chunk_bytes, need_hidden=need_h, need_weight=need_w, need_bias=need_b
        )
    return backward_fused.lce_backward(
        problem, stats, coef, need_hidden=need_h, need_weight=need_w, need_bias=need_b, deterministic=deterministic
    )


def _auto_strategy(
    hidden: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype, need_weight: bool, deterministic: bool
) -> str:
    """``backward_impl="auto"``: the strategy ``cost_model.choose_backward`` predicts faster
    on this device for this head and token count, within a share of the device's memory
    (``cost_model.MATMUL_MEMORY_SHARE``); ``"fused"`` off a GPU (the interpreter) and with
    ``deterministic=True`` (its kernels are the reproducible ones)."""
    from ..kernels.config import device_capability, device_memory_bytes, device_sm_count
    from ..kernels.cost_model import choose_backward

    capability = device_capability(hidden.device)
    if deterministic or capability is None:
        return "fused"
    return choose_backward(
        hidden.shape[0],
        hidden.shape[1],
        weight.shape[0],
        dtype.itemsize,
        capability,
        device_sm_count(hidden.device),
        need_weight,
        device_memory_bytes(hidden.device),
    )
