"""The three-product path: gradients formed in the forward pass, for losses whose per-token
weights are known before it.

A weighted loss ``sum_t g_t loss_t`` needs ``dloss/dz = g_t (softmax(z_t) - onehot)``
(with the extra terms of ``op.loss_terms``), and the softmax needs each token's whole row of
logits.  When ``g`` depends on the losses (IR-DRO, the rankings) it is known only after
the forward, so the backward recomputes the logits: four ``N x H x V`` products.  When it
does not (``reduction="mean"``/``"sum"``, the paper's uniform baseline, data weights
alone), the gradients can be formed while the logits are at hand: three products, and
the backward only scales the stored gradients by the upstream gradient.

Per chunk of scored tokens (full vocabulary rows: the chunk's fp32 logits take at most
``HeadConfigs.matmul_chunk_bytes``):

    z   = h @ W.T                        library matmul, fp32 result
    lse, nll, smooth                     the forward kernel reading z (STORED_LOGITS)
    dz  = g (softmax - onehot) ...       the ``"matmul"`` strategy's elementwise kernel
    grad_h[chunk] = dz @ W               library matmul, fp32 result, cast
    grad_W       += dz.T @ h[chunk]      library matmul into an fp32 sum over the chunks

Memory beyond the four-product path: the logits chunk and its ``dz``, and for a trainable
half-precision head an fp32 sum of the whole weight gradient (``cost_model
.forward_gradient_extra_bytes``); ``backward_impl="auto"`` takes this path only where that
fits (``cost_model.choose_forward_gradients``).  Tokens that are not scored are left out
(gathered once: one host synchronisation).
"""

from __future__ import annotations

import dataclasses

import torch

from ..kernels.config import KernelConfig, interpreter_active
from ..tokens import compute_dtype
from .loss_terms import LossTerms

# The forward kernel's tile for reading stored logits: a memory-bound pass, so a small
# tile; 32 x 128 at 4 warps compiles without spills on every architecture with every term
# (64 x 128 spilled at 4 warps, and on sm_90 at 8; tests/kernels/test_compile.py).
STATS_CONFIG = KernelConfig(block_n=32, block_v=128, block_h=16, num_warps=4, num_stages=1)


def _stats_config(configs) -> KernelConfig:
    """:data:`STATS_CONFIG` (the interpreter keeps its own large tiles: fewer programs)."""
    if interpreter_active():
        return configs.forward
    return dataclasses.replace(STATS_CONFIG, fp32_precision=configs.forward.fp32_precision)


def forward_with_gradients(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    token_weight: torch.Tensor,
    ignore_index: int,
    softcap: float | None,
    terms: LossTerms,
    needs: tuple[bool, bool, bool],
    config=None,
    autocast: torch.dtype | None = None,
):
    """``(loss, token_loss, grad_hidden, grad_weight, grad_bias)``: the fp32 scalar
    ``sum_t token_weight[t] * loss_t`` over the scored tokens, the fp32 per-token loss (0
    where not scored) and the gradients of that scalar (None where not in ``needs``), in
    the inputs' dtypes."""
    from ..kernels.backward_matmul import _mm, dlogits
    from ..kernels.forward import lse_forward
    from .triton_path import _configs, head_problem

    dtype = compute_dtype(hidden, weight, autocast)
    configs = _configs(hidden, weight, config, dtype)
    need_h, need_w, need_b = needs
    need_b = need_b and bias is not None
    device, n_vocab, _n_hidden = hidden.device, weight.shape[0], hidden.shape[1]
    valid = targets != ignore_index
    index = valid.nonzero().squeeze(1)  # the scored tokens: one host synchronisation
    n = index.numel()
    token_loss = torch.zeros(hidden.shape[0], dtype=torch.float32, device=device)
    grad_hidden = torch.zeros_like(hidden) if need_h else None
    grad_bias = torch.zeros(n_vocab, dtype=torch.float32, device=device) if need_b else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=device) if need_w else None
    if n:
        everything = n == hidden.shape[0]
        h = (hidden if everything else hidden[index]).to(dtype)
        t, g = targets[index], token_weight[index].float()
        w = weight.to(dtype)
        block = configs.backward.block_n
        rows = min(n, max(block, configs.matmul_chunk_bytes // (4 * n_vocab) // block * block))
        z = torch.empty((rows, n_vocab), dtype=torch.float32, device=device)
        dz = z if dtype == torch.float32 else torch.empty((rows, n_vocab), dtype=dtype, device=device)
        bias_part = torch.empty(n_vocab, dtype=torch.float32, device=device) if need_b else None
        stats_config = _stats_config(configs)
        for t0 in range(0, n, rows):
            c = min(rows, n - t0)
            h_c, t_c, g_c, z_c, dz_c = h[t0 : t0 + c], t[t0 : t0 + c], g[t0 : t0 + c], z[:c], dz[:c]
            _mm(h_c, w.T, out=z_c)
            scored = torch.ones(c, dtype=torch.bool, device=device)  # every token of the chunk, in order
            problem = head_problem(h_c, w, bias, t_c, scored, softcap, dtype, stats_config, terms, smooth=terms.smooth)
            stats = lse_forward(problem, logits=z_c)
            lse, nll = stats.stats[:, 0], stats.stats[:, 1]
            token_loss[index[t0 : t0 + c]] = terms.token_loss(lse, nll, stats.smooth, t_c, scored, n_vocab)
            if not (need_h or need_w or need_b):
                continue
            coef = terms.coefficients(g_c, None, lse, t_c, scored, n_vocab).contiguous()
            problem = dataclasses.replace(problem, config=configs.backward, smooth=False, rich_coef=coef.dim() == 2)
            dlogits(problem, z_c, dz_c, stats.stats, coef, 0, bias_part)
            if need_b:
                grad_bias += bias_part
            if need_h:
                rows_h = _mm(dz_c, w).to(hidden.dtype)
                if everything:
                    grad_hidden[t0 : t0 + c] = rows_h
                else:
                    grad_hidden[index[t0 : t0 + c]] = rows_h
            if need_w:
                _mm(dz_c.T, h_c, out=grad_weight, accumulate=True)
    loss = (token_loss * torch.where(valid, token_weight.float(), 0.0)).sum()
    return (
        loss,
        token_loss,
        grad_hidden,
        grad_weight.to(weight.dtype) if need_w else None,
        grad_bias.to(bias.dtype) if need_b else None,
    )
