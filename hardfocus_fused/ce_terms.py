"""The cross-entropy variants the fused op computes, from per-token statistics (O(tokens)).

Both implementations (Triton kernels, chunked torch) produce per token ``lse``, ``nll =
lse - z_target`` and, when needed, ``smooth = sum_v c_v z_v`` (``c`` the class weights,
or 1) and the argmax.  From them, with PyTorch's semantics for ``F.cross_entropy(...,
weight=c, label_smoothing=eps)`` and Liger's for the z-loss (``lse_square_scale`` s), the
per-token loss of a scored token with target y is

    loss = (1 - eps) c_y nll + (eps / V) (C lse - smooth) + s lse^2          (C = sum_v c_v)

and its gradient with respect to the logits, given the upstream gradients ``g`` of the
loss and ``g_lse`` of a returned log-sum-exp,

    dloss/dz_v = a (p_v - [v = y]) + e p_v - u c_v,
    a = g (1 - eps) c_y,   u = g eps / V,   e = u C + 2 s g lse + g_lse.

The kernels take ``(a, e, u)`` per token (``tiles.dlogit_tile``); plain cross-entropy
needs ``a`` alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LossTerms:
    """The options that change the per-token loss (all off: plain cross-entropy)."""

    label_smoothing: float = 0.0
    class_weight: torch.Tensor | None = None     # (V,) fp32
    lse_square_scale: float = 0.0

    @property
    def plain(self) -> bool:
        return not self.label_smoothing and self.class_weight is None and not self.lse_square_scale

    @property
    def smooth(self) -> bool:
        """The forward must sum ``c_v z_v``."""
        return self.label_smoothing > 0

    def class_total(self, n_vocab: int) -> torch.Tensor | float:
        return self.class_weight.sum() if self.class_weight is not None else float(n_vocab)

    def target_weight(self, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor | None:
        """``c_y`` per token (0 where not scored), or None without class weights."""
        if self.class_weight is None:
            return None
        return torch.where(valid, self.class_weight[targets.clamp(0, self.class_weight.numel() - 1)], 0.0)

    def token_loss(self, lse: torch.Tensor, nll: torch.Tensor, smooth: torch.Tensor | None,
                   targets: torch.Tensor, valid: torch.Tensor, n_vocab: int) -> torch.Tensor:
        """The per-token loss (0 where not scored)."""
        if self.plain:
            return torch.where(valid, nll, 0.0)
        eps = self.label_smoothing
        weight = self.target_weight(targets, valid)
        loss = (1.0 - eps) * (nll if weight is None else weight * nll)
        if eps:
            loss = loss + (eps / n_vocab) * (self.class_total(n_vocab) * lse - smooth)
        if self.lse_square_scale:
            loss = loss + self.lse_square_scale * lse * lse
        return torch.where(valid, loss, 0.0)

    def z_loss(self, lse: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The z-loss part ``s lse^2`` of each token's loss (0 where not scored)."""
        return torch.where(valid, self.lse_square_scale * lse * lse, 0.0)

    def coefficients(self, grad_loss: torch.Tensor, grad_lse: torch.Tensor | None, lse: torch.Tensor,
                     targets: torch.Tensor, valid: torch.Tensor, n_vocab: int) -> torch.Tensor:
        """The kernels' per-token coefficients, in the gradients' dtype: (N,) ``a`` for plain
        cross-entropy with no log-sum-exp gradient, else (N, 3) ``(a, e, u)`` (0 where not
        scored)."""
        g = torch.where(valid, grad_loss, 0.0)
        if self.plain and grad_lse is None:
            return g
        weight = self.target_weight(targets, valid)
        a = (1.0 - self.label_smoothing) * (g if weight is None else g * weight)
        u = g * (self.label_smoothing / n_vocab)
        e = u * self.class_total(n_vocab) + 2.0 * self.lse_square_scale * g * lse
        if grad_lse is not None:
            e = e + torch.where(valid, grad_lse, 0.0)
        return torch.stack([a, e, u], dim=1)

    def denominator(self, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """What ``reduction="mean"`` divides by: the class weights of the scored targets
        (PyTorch's weighted mean), or their count."""
        weight = self.target_weight(targets, valid)
        return valid.sum() if weight is None else weight.sum()
