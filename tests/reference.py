"""Independent fp64 reference: materialises the logits and weights sequences with plain
Python, sharing no code with the package."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def reference_token_nll(hidden, weight, targets, bias=None, softcap=None, ignore_index=-100):
    """fp64 per-token NLL with the shape of ``targets`` (0 where ignored)."""
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    flat = z.reshape(-1, weight.shape[0])
    nll = F.cross_entropy(flat, targets.reshape(-1), ignore_index=ignore_index, reduction="none")
    return nll.view(targets.shape)


def reference_weights(seq_loss: list[float], n_tokens: list[int], method, r, n1, n2, seq_reduction):
    live = [i for i, n in enumerate(n_tokens) if n > 0]
    w = [0.0] * len(seq_loss)
    if not live:
        return w
    b = len(live)
    if method == "irdro":
        top = max(seq_loss[i] / r for i in live)
        e = {i: math.exp(seq_loss[i] / r - top) for i in live}
        total = sum(e.values())
        for i in live:
            w[i] = e[i] / total
    elif method == "uniform":
        for i in live:
            w[i] = 1.0 / b
    elif method == "mean":
        total = sum(n_tokens)
        for i in live:
            w[i] = (n_tokens[i] if seq_reduction == "mean" else 1) / total
    else:
        ranked = sorted(live, key=lambda i: (-seq_loss[i], i))
        keep = min(b, max(1, math.floor(n2 * b)))
        start = {"highranking": 0, "lowranking": b - keep}.get(method, min(math.floor(n1 * b), b - keep))
        for i in ranked[start : start + keep]:
            w[i] = 1.0 / keep
    return w


def reference_loss(
    hidden,
    weight,
    labels,
    *,
    bias=None,
    method="irdro",
    r=10.0,
    n1=0.25,
    n2=0.25,
    seq_reduction="mean",
    ignore_index=-100,
    shift=True,
    softcap=None,
):
    """``(loss, seq_loss, weights, n_tokens)`` in fp64; differentiable w.r.t. the inputs."""
    targets = labels
    k = int(shift)  # True is 1; an int k scores position t against labels[:, t + k]
    if k:
        targets = torch.full_like(labels, ignore_index)
        if k < labels.shape[1]:
            targets[:, : labels.shape[1] - k] = labels[:, k:]
    nll = reference_token_nll(hidden, weight, targets, bias, softcap, ignore_index)
    n_tokens = (targets != ignore_index).sum(1)
    seq_loss = nll.sum(1)
    if seq_reduction == "mean":
        seq_loss = seq_loss / n_tokens.clamp_min(1)
    w = reference_weights(seq_loss.tolist(), n_tokens.tolist(), method, r, n1, n2, seq_reduction)
    weights = torch.tensor(w, dtype=torch.float64, device=hidden.device)
    return (weights * seq_loss).sum(), seq_loss, weights, n_tokens


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (absolute error when expected is all zero)."""
    diff = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    return diff / scale if scale > 0 else diff


def reference_logprobs(hidden, weight, labels, bias=None, temperature=1.0, softcap=None):
    """fp64 ``(log-prob of each next token, entropy, lse)``, 0 where not scored."""
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    valid = targets != -100
    logp = torch.log_softmax(z, dim=-1)
    token_logp = torch.where(valid, logp.gather(-1, targets.clamp_min(0)[..., None]).squeeze(-1), 0.0)
    entropy = torch.where(valid, -(logp.exp() * logp).sum(-1), 0.0)
    lse = torch.where(valid, torch.logsumexp(z, dim=-1), 0.0)
    return token_logp, entropy, lse
