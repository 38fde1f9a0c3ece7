"""Autograd wrapper around the Triton kernels: per-token loss of ``hidden @ weight.T``."""

from __future__ import annotations

import torch

from ._tokens import compute_dtype, partition_active
from .ce_terms import LossTerms


class TritonLinearCrossEntropy(torch.autograd.Function):
    """Per-token ``(loss, lse, argmax)`` (N,) each: the fp32 loss of ``terms``
    (``ce_terms.LossTerms``; plain cross-entropy by default) and log-sum-exp, both
    differentiable, and the int64 argmax (an empty tensor unless ``argmax``).  The backward
    accepts any per-token upstream gradients.

    ``config`` is a ``KernelConfig`` (every pass) or ``HeadConfigs`` (per pass), None for
    the defaults; ``backward`` is the backward strategy, ``"fused"`` (the atomic Triton
    kernel, or the deterministic kernels) or ``"matmul"`` (``kernels.backward_matmul``).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index, softcap, deterministic, config, autocast=None,
                backward="fused", terms=LossTerms(), argmax=False):
        from .kernels import HeadConfigs, HeadProblem, default_configs, lse_forward

        dtype = compute_dtype(hidden, weight, autocast)
        if config is None:
            configs = default_configs(hidden.shape[0], weight.shape[0], hidden.shape[1], dtype)
        else:
            configs = HeadConfigs.of(config)
        valid = targets != ignore_index
        problem = HeadProblem(hidden, weight, bias, targets, *partition_active(valid), softcap, dtype, configs.forward,
                              class_weight=terms.class_weight, smooth=terms.smooth, argmax=argmax)
        out = lse_forward(problem)
        lse = torch.where(valid, out.stats[:, 0], 0.0)
        loss = terms.token_loss(lse, out.stats[:, 1], out.smooth, targets, valid, weight.shape[0])
        ctx.save_for_backward(hidden, weight, bias, targets, out.stats, valid)
        ctx.softcap, ctx.configs, ctx.dtype, ctx.deterministic, ctx.strategy, ctx.terms = (
            softcap, configs, dtype, deterministic, backward, terms)
        ctx.set_materialize_grads(False)
        best = torch.where(valid, out.argmax, -1) if argmax else torch.empty(0, dtype=torch.long, device=loss.device)
        ctx.mark_non_differentiable(best)
        return loss, lse, best

    @staticmethod
    def backward(ctx, grad_loss, grad_lse, _):
        from .kernels import HeadProblem, lce_backward, matmul_backward

        hidden, weight, bias, targets, stats, valid = ctx.saved_tensors
        if grad_loss is None:
            grad_loss = torch.zeros_like(stats[:, 0])
        coef = ctx.terms.coefficients(grad_loss.float(), grad_lse.float() if grad_lse is not None else None,
                                      stats[:, 0], targets, valid, weight.shape[0])
        configs = ctx.configs
        config = configs.deterministic if ctx.deterministic and ctx.strategy == "fused" else configs.backward
        # Only tokens with a non-zero coefficient enter the backward.
        active = coef != 0 if coef.dim() == 1 else (coef != 0).any(dim=1)
        problem = HeadProblem(hidden, weight, bias, targets, *partition_active(active), ctx.softcap, ctx.dtype,
                              config, class_weight=ctx.terms.class_weight, rich_coef=coef.dim() == 2)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        coef = coef.contiguous()
        if ctx.strategy == "matmul":
            grads = matmul_backward(problem, stats, coef, configs.matmul_chunk_bytes, need_hidden=need_h,
                                    need_weight=need_w, need_bias=need_b)
        else:
            grads = lce_backward(problem, stats, coef, need_hidden=need_h, need_weight=need_w, need_bias=need_b,
                                 deterministic=ctx.deterministic)
        return (*grads, None, None, None, None, None, None, None, None, None)
