"""Pure-PyTorch fallback: the same per-token NLL, computed in token chunks (the forward and
backward that ``registration`` registers for ``impl="torch"``).

Each chunk materialises at most ``chunk_budget_bytes`` of logits (and as much again for
their softmax in the backward), so memory stays bounded whatever the token count.  The
matmuls run in fp32 (fp64 for fp64 inputs) whatever the input dtype: this path is the
accuracy-first fallback for CPUs and machines without Triton.  Tokens whose upstream
gradient is zero (ignored labels, sequences a ranking method dropped) are skipped in the
backward.
"""

from __future__ import annotations

import contextlib

import torch

from .loss_terms import PLAIN, LossTerms

DEFAULT_CHUNK_BUDGET_BYTES = 16 * 2**20


def _head_in(acc: torch.dtype, weight: torch.Tensor, bias: torch.Tensor | None):
    """The head in the accumulation dtype (a copy only for low-precision heads)."""
    return weight.to(acc), bias.to(acc) if bias is not None else None


def chunk_tokens(n_vocab: int, budget_bytes: int, itemsize: int) -> int:
    """Tokens per chunk so that one (chunk x V) logits block fits the budget."""
    return max(1, budget_bytes // (n_vocab * itemsize))


def _logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, softcap: float | None) -> torch.Tensor:
    z = h @ w.T
    if b is not None:
        z += b
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def without_autocast(device: torch.device):
    """A context in which this path's matmuls run in the dtype it chose (fp32/fp64), not
    autocast's, forward and backward (a backward may be called inside an autocast region)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    ignore_index: int,
    softcap: float | None,
    terms: LossTerms = PLAIN,
    argmax: bool = False,
    entropy: bool = False,
):
    """Per-token ``(loss, lse, argmax, entropy, residual)``: the loss of ``terms`` and the
    log-sum-exp (fp32, fp64 for fp64 inputs; 0 where not scored), the int64 argmax (-1
    where not scored; empty unless ``argmax``), the softmax's entropy (0 where not scored;
    empty unless ``entropy``), and what :func:`backward` needs, (N, 2) ``(lse, nll)``."""
    with without_autocast(hidden.device):
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        w, b = _head_in(acc, weight, bias)
        c = terms.class_weight.to(acc) if terms.class_weight is not None else None
        valid = targets != ignore_index
        lse = torch.zeros(hidden.shape[0], dtype=acc, device=hidden.device)
        nll = torch.zeros_like(lse)
        smooth = torch.zeros_like(lse) if terms.smooth else None
        best = torch.full_like(targets, -1) if argmax else torch.empty(0, dtype=torch.long, device=hidden.device)
        ent = torch.zeros_like(lse) if entropy else lse.new_empty(0)
        step = chunk_tokens(weight.shape[0], DEFAULT_CHUNK_BUDGET_BYTES, w.element_size())
        for idx in valid.nonzero().squeeze(1).split(step):
            z = _logits(hidden[idx].to(acc), w, b, softcap)
            if smooth is not None:
                smooth[idx] = z.sum(dim=1) if c is None else z @ c
            row_max, top = z.max(dim=1)
            if argmax:
                best[idx] = z.argmax(dim=1)  # the first maximum
            terms_ = torch.exp(z - row_max[:, None])
            terms_.scatter_(1, top[:, None], 0.0)  # the max's own 1, left out of the sum
            rest = terms_.sum(dim=1)
            log_total = torch.log1p(rest)
            lse[idx] = row_max + log_total
            if entropy:  # sum p (m - z) + log T, every term >= 0: see kernels/forward.merge_entropy
                gap = (terms_ * (row_max[:, None] - z)).sum(dim=1)
                ent[idx] = gap / (1.0 + rest) + log_total
            # (max - z_target) + log1p(rest), not lse - z_target: keeps a small NLL (a
            # confident prediction) to its own precision; see kernels/forward.py.
            nll[idx] = (row_max - z.gather(1, targets[idx, None]).squeeze(1)) + log_total
        loss = terms.token_loss(lse, nll, smooth, targets, valid, weight.shape[0])
        return loss, lse, best, ent, torch.stack([lse, nll], dim=1)


def backward(
    grad_loss: torch.Tensor | None,
    grad_lse: torch.Tensor | None,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    residual: torch.Tensor,
    ignore_index: int,
    softcap: float | None,
    terms: LossTerms,
    needs: tuple[bool, bool, bool],
    grad_entropy: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
):
    """Gradients ``(hidden, weight, bias)`` (None where not in ``needs``) for per-token
    upstream gradients of the loss, of the log-sum-exp and of the entropy (None: zero;
    ``entropy``: the forward's, needed with ``grad_entropy``)."""
    with without_autocast(hidden.device):
        need_h, need_w, need_b = needs
        lse, nll = residual.unbind(1)
        acc = lse.dtype
        valid = targets != ignore_index
        w, b = _head_in(acc, weight, bias)
        coef = terms.upstream_coefficients(
            grad_loss, grad_lse, grad_entropy, lse, entropy, targets, valid, weight.shape[0]
        )
        rich = coef.dim() == 2
        c = terms.class_weight.to(acc) if terms.class_weight is not None else None
        grad_h = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        active = (coef != 0).any(dim=1) if rich else coef != 0
        step = chunk_tokens(weight.shape[0], DEFAULT_CHUNK_BUDGET_BYTES, w.element_size())
        for idx in active.nonzero().squeeze(1).split(step):
            h = hidden[idx].to(acc)
            z = _logits(h, w, b, softcap)
            prob = torch.exp(z - lse[idx, None])
            dz = prob.clone()
            # p_t - 1 without cancelling against 1 (see kernels/tiles.py, dlogit_tile).
            dz[torch.arange(idx.numel(), device=idx.device), targets[idx]] = torch.expm1(-nll[idx])
            if rich:  # a (p - onehot) + e p - u c [+ k p (z - mu)], see loss_terms
                a, e, u = coef[idx, :3].unbind(1)
                dz = dz * a[:, None] + prob * e[:, None] - u[:, None] * (c[None, :] if c is not None else 1.0)
                if coef.shape[1] == 5:
                    k, mu = coef[idx, 3:].unbind(1)
                    dz += k[:, None] * prob * (z - mu[:, None])
            else:
                dz *= coef[idx, None]
            if softcap is not None:
                dz *= 1.0 - (z / softcap) ** 2
            if need_h:
                grad_h[idx] = dz @ w
            if need_w:
                grad_w.addmm_(dz.T, h)
            if need_b:
                grad_b += dz.sum(0)
        return (
            grad_h.to(hidden.dtype) if need_h else None,
            grad_w.to(weight.dtype) if need_w else None,
            grad_b.to(bias.dtype) if need_b else None,
        )
