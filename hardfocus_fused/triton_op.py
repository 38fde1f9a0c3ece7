"""Autograd wrapper around the Triton kernels: per-token NLL of ``hidden @ weight.T``."""

from __future__ import annotations

import torch

from ._tokens import compute_dtype, partition_active


class TritonLinearCrossEntropy(torch.autograd.Function):
    """Per-token NLL (N,) fp32; the backward accepts any per-token upstream gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index, softcap, deterministic, config):
        from .kernels import default_config, lse_forward

        dtype = compute_dtype(hidden, weight)
        if config is None:
            config = default_config(hidden.shape[0], weight.shape[0], hidden.shape[1], dtype)
        valid = targets != ignore_index
        order, n_active = partition_active(valid)
        stats = lse_forward(hidden, weight, bias, targets, order, n_active, softcap, dtype, config)   # (lse, nll)
        nll = torch.where(valid, stats[:, 1], 0.0)
        ctx.save_for_backward(hidden, weight, bias, targets, stats, valid)
        ctx.softcap, ctx.config, ctx.dtype, ctx.deterministic = softcap, config, dtype, deterministic
        return nll

    @staticmethod
    def backward(ctx, grad_nll):
        from .kernels import lce_backward

        hidden, weight, bias, targets, stats, valid = ctx.saved_tensors
        coef = torch.where(valid, grad_nll.float(), 0.0)
        order, n_active = partition_active(coef != 0)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h, grad_w, grad_b = lce_backward(
            hidden, weight, bias, targets, order, n_active, stats, coef, ctx.softcap, ctx.dtype, ctx.config,
            need_hidden=need_h, need_weight=need_w, need_bias=need_b, deterministic=ctx.deterministic,
        )
        return (
            grad_h.to(hidden.dtype) if grad_h is not None else None,
            grad_w.to(weight.dtype) if grad_w is not None else None,
            grad_b.to(bias.dtype) if grad_b is not None else None,
            None, None, None, None, None,
        )
