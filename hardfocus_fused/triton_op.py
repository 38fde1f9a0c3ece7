"""Autograd wrapper around the Triton kernels: per-token NLL of ``hidden @ weight.T``."""

from __future__ import annotations

import torch

from ._tokens import compute_dtype, partition_active


class TritonLinearCrossEntropy(torch.autograd.Function):
    """Per-token NLL (N,) fp32; the backward accepts any per-token upstream gradient.

    ``config`` is a ``KernelConfig`` (every pass) or ``HeadConfigs`` (per pass), None for
    the defaults; ``backward`` is the backward strategy, ``"fused"`` (the atomic Triton
    kernel, or the deterministic kernels) or ``"matmul"`` (``kernels.backward_matmul``).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index, softcap, deterministic, config, autocast=None,
                backward="fused"):
        from .kernels import HeadConfigs, HeadProblem, default_configs, lse_forward

        dtype = compute_dtype(hidden, weight, autocast)
        if config is None:
            configs = default_configs(hidden.shape[0], weight.shape[0], hidden.shape[1], dtype)
        else:
            configs = HeadConfigs.of(config)
        valid = targets != ignore_index
        problem = HeadProblem(hidden, weight, bias, targets, *partition_active(valid), softcap, dtype, configs.forward)
        stats = lse_forward(problem)   # (lse, nll) per token
        nll = torch.where(valid, stats[:, 1], 0.0)
        ctx.save_for_backward(hidden, weight, bias, targets, stats, valid)
        ctx.softcap, ctx.configs, ctx.dtype, ctx.deterministic, ctx.strategy = (softcap, configs, dtype, deterministic,
                                                                                backward)
        return nll

    @staticmethod
    def backward(ctx, grad_nll):
        from .kernels import HeadProblem, lce_backward, matmul_backward

        hidden, weight, bias, targets, stats, valid = ctx.saved_tensors
        coef = torch.where(valid, grad_nll.float(), 0.0)
        configs = ctx.configs
        config = configs.deterministic if ctx.deterministic and ctx.strategy == "fused" else configs.backward
        # Only tokens with a non-zero coefficient enter the backward.
        problem = HeadProblem(hidden, weight, bias, targets, *partition_active(coef != 0), ctx.softcap, ctx.dtype,
                              config)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if ctx.strategy == "matmul":
            grads = matmul_backward(problem, stats, coef, configs.matmul_chunk_bytes, need_hidden=need_h,
                                    need_weight=need_w, need_bias=need_b)
        else:
            grads = lce_backward(problem, stats, coef, need_hidden=need_h, need_weight=need_w, need_bias=need_b,
                                 deterministic=ctx.deterministic)
        return (*grads, None, None, None, None, None, None, None)
