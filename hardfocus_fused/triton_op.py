"""Autograd wrapper around the Triton kernels: per-token NLL of ``hidden @ weight.T``."""

from __future__ import annotations

import torch

from ._tokens import compute_dtype, partition_active


class TritonLinearCrossEntropy(torch.autograd.Function):
    """Per-token NLL (N,) fp32; the backward accepts any per-token upstream gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index, softcap, deterministic, config, autocast=None):
        from .kernels import HeadProblem, default_config, lse_forward

        dtype = compute_dtype(hidden, weight, autocast)
        if config is None:
            config = default_config(hidden.shape[0], weight.shape[0], hidden.shape[1], dtype)
        valid = targets != ignore_index
        problem = HeadProblem(hidden, weight, bias, targets, *partition_active(valid), softcap, dtype, config)
        stats = lse_forward(problem)   # (lse, nll) per token
        nll = torch.where(valid, stats[:, 1], 0.0)
        ctx.save_for_backward(hidden, weight, bias, targets, stats, valid)
        ctx.softcap, ctx.config, ctx.dtype, ctx.deterministic = softcap, config, dtype, deterministic
        return nll

    @staticmethod
    def backward(ctx, grad_nll):
        from .kernels import HeadProblem, lce_backward

        hidden, weight, bias, targets, stats, valid = ctx.saved_tensors
        coef = torch.where(valid, grad_nll.float(), 0.0)
        # Only tokens with a non-zero coefficient enter the backward kernels.
        problem = HeadProblem(hidden, weight, bias, targets, *partition_active(coef != 0), ctx.softcap, ctx.dtype,
                              ctx.config)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grads = lce_backward(problem, stats, coef, need_hidden=need_h, need_weight=need_w, need_bias=need_b,
                             deterministic=ctx.deterministic)
        return (*grads, None, None, None, None, None, None)
