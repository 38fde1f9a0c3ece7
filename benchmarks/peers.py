"""The weighted loss through each implementation a user could pick.

Every case returns the same quantity, IR-DRO (or MidRanking) over the batch's sequences:
per-token NLL from the implementation, per-sequence mean, weights from
``hardfocus_fused.sequence_weights`` (constants), weighted sum.  Only the per-token NLL
differs; ``hardfocus`` computes it all in one call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hardfocus_fused import hardfocus_loss, sequence_weights

IMPLS = ("eager", "torch_compile", "liger", "cce", "cce_exact", "torch_native", "hardfocus")
# Cut Cross-Entropy twice: ``cce`` at its default, which skips gradient blocks whose
# probabilities fall below a threshold (``filter_eps="high"``), and ``cce_exact`` with
# ``filter_eps=None``, the exact gradients every other implementation computes.
CCE_FILTER = {"cce": "high", "cce_exact": None}


def shifted(labels: torch.Tensor) -> torch.Tensor:
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in fp32, or kept in fp64: the fp64 accuracy reference must stay fp64 throughout."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def weighted(nll: torch.Tensor, targets: torch.Tensor, method: str) -> torch.Tensor:
    n_tokens = (targets != -100).sum(1)
    seq_loss = at_least_fp32(nll).sum(1) / n_tokens.clamp_min(1)
    return (sequence_weights(seq_loss, n_tokens, method=method) * seq_loss).sum()


def _eager(hidden, weight, targets, method):
    logits = at_least_fp32(hidden @ weight.T)
    nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none", ignore_index=-100)
    return weighted(nll, targets, method)


_compiled = {}


def unavailable(impl: str, device: str) -> str | None:
    """Why ``impl`` cannot run here, or None."""
    if impl in ("liger", *CCE_FILTER):
        if device != "cuda":
            return f"{impl} needs CUDA"
        module = "liger_kernel" if impl == "liger" else "cut_cross_entropy"
        try:
            __import__(module)
        except ImportError as err:
            return f"{module} not importable ({err})"
    if impl == "torch_native" and not hasattr(F, "linear_cross_entropy"):
        return f"torch {torch.__version__} has no F.linear_cross_entropy (new in 2.13)"
    return None


def loss_fn(impl: str, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, method: str):
    """A zero-argument callable computing the weighted loss of ``impl``."""
    batch, seq, size = hidden.shape
    targets = shifted(labels)
    flat_h, flat_t = hidden.reshape(-1, size), targets.reshape(-1)
    if impl == "hardfocus":
        which = "triton" if hidden.is_cuda else "torch"
        return lambda: hardfocus_loss(hidden, weight, labels, method=method, impl=which)
    if impl == "eager":
        return lambda: _eager(hidden, weight, targets, method)
    if impl == "torch_compile":
        compiled = _compiled.setdefault(method, torch.compile(_eager, dynamic=False))
        return lambda: compiled(hidden, weight, targets, method)
    if impl == "torch_native":
        options = torch.nn.LinearCrossEntropyOptions()
        return lambda: weighted(
            F.linear_cross_entropy(flat_h, weight, flat_t, reduction="none", ignore_index=-100, options=options).view(
                batch, seq
            ),
            targets,
            method,
        )
    if impl == "liger":
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        module = LigerFusedLinearCrossEntropyLoss(reduction="none", ignore_index=-100)

        def liger():
            out = module(weight, flat_h, flat_t)
            return weighted((out[0] if isinstance(out, tuple) else out).view(batch, seq), targets, method)

        return liger
    if impl in CCE_FILTER:
        from cut_cross_entropy import linear_cross_entropy

        return lambda: weighted(
            linear_cross_entropy(flat_h, weight, flat_t, reduction="none", filter_eps=CCE_FILTER[impl]).view(
                batch, seq
            ),
            targets,
            method,
        )
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
