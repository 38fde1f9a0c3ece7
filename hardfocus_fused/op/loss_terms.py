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

Reductions follow Liger's definition: class weights weigh the cross-entropy (with its
smoothing), not the z-loss.  A mean over scored tokens ``T`` is therefore

    mean = sum_T ce / sum_T c_y  +  sum_T s lse^2 / |T|

(with no class weights both denominators are ``|T|`` and it is the plain mean of the
per-token loss).  With class weights and a z-loss together the callers get the z-loss out
of the kernels' loss (``kernel_terms``) and add it from the differentiable log-sum-exp
(``z_loss``), so each part can have its own denominator.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class LossTerms:
    """The options that change the per-token loss (all off: plain cross-entropy)."""

    label_smoothing: float = 0.0
    class_weight: torch.Tensor | None = None  # (V,) fp32
    lse_square_scale: float = 0.0

    @property
    def plain(self) -> bool:
        return not self.label_smoothing and self.class_weight is None and not self.lse_square_scale

    @property
    def smooth(self) -> bool:
        """The forward must sum ``c_v z_v``."""
        return self.label_smoothing > 0

    @property
    def separate_z_loss(self) -> bool:
        """Whether a mean needs the z-loss apart from the rest: class weights and a z-loss
        together (the two parts have different denominators)."""
        return self.class_weight is not None and bool(self.lse_square_scale)

    def kernel_terms(self) -> LossTerms:
        """The terms the kernels compute: all of them, or all but the z-loss when it must
        stay apart (``separate_z_loss``; callers add ``z_loss`` of the differentiable lse)."""
        return replace(self, lse_square_scale=0.0) if self.separate_z_loss else self

    def class_total(self, n_vocab: int) -> torch.Tensor | float:
        return self.class_weight.sum() if self.class_weight is not None else float(n_vocab)

    def target_weight(self, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor | None:
        """``c_y`` per token (0 where not scored), or None without class weights."""
        if self.class_weight is None:
            return None
        return torch.where(valid, self.class_weight[targets.clamp(0, self.class_weight.numel() - 1)], 0.0)

    def token_loss(
        self,
        lse: torch.Tensor,
        nll: torch.Tensor,
        smooth: torch.Tensor | None,
        targets: torch.Tensor,
        valid: torch.Tensor,
        n_vocab: int,
    ) -> torch.Tensor:
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
        """The z-loss part ``s lse^2`` of each token's loss (0 where not scored);
        differentiable when ``lse`` is."""
        return torch.where(valid, self.lse_square_scale * lse * lse, 0.0)

    def upstream_coefficients(
        self,
        grad_loss: torch.Tensor | None,
        grad_lse: torch.Tensor | None,
        grad_entropy: torch.Tensor | None,
        lse: torch.Tensor,
        entropy: torch.Tensor | None,
        targets: torch.Tensor,
        valid: torch.Tensor,
        n_vocab: int,
    ) -> torch.Tensor:
        """:meth:`coefficients` from the upstream gradients as autograd hands them over (None:
        zero), each cast to ``lse``'s dtype first."""
        dtype = lse.dtype
        grad_loss = grad_loss.to(dtype) if grad_loss is not None else torch.zeros_like(lse)
        grad_lse = grad_lse.to(dtype) if grad_lse is not None else None
        grad_entropy = grad_entropy.to(dtype) if grad_entropy is not None else None
        return self.coefficients(grad_loss, grad_lse, lse, targets, valid, n_vocab, grad_entropy, entropy)

    def coefficients(
        self,
        grad_loss: torch.Tensor,
        grad_lse: torch.Tensor | None,
        lse: torch.Tensor,
        targets: torch.Tensor,
        valid: torch.Tensor,
        n_vocab: int,
        grad_entropy: torch.Tensor | None = None,
        entropy: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The kernels' per-token coefficients, in the gradients' dtype: (N,) ``a`` for plain
        cross-entropy with no log-sum-exp or entropy gradient; (N, 3) ``(a, e, u)`` with a
        log-sum-exp gradient or extra terms; (N, 5) ``(a, e, u, k, mu)`` with an entropy
        gradient (``k = -grad_entropy``, ``mu = lse - entropy``: the entropy's gradient is
        ``-p (z - mu)``).  0 where not scored."""
        g = torch.where(valid, grad_loss, 0.0)
        if grad_entropy is not None:
            rich = self.coefficients(
                grad_loss, grad_lse if grad_lse is not None else torch.zeros_like(g), lse, targets, valid, n_vocab
            )
            k = torch.where(valid, -grad_entropy.to(g.dtype), 0.0)
            mu = torch.where(valid, lse - entropy, 0.0).to(g.dtype)
            return torch.cat([rich, k[:, None], mu[:, None]], dim=1)
        if self.plain and grad_lse is None:
            return g
        weight = self.target_weight(targets, valid)
        a = (1.0 - self.label_smoothing) * (g if weight is None else g * weight)
        u = g * (self.label_smoothing / n_vocab)
        e = u * self.class_total(n_vocab) + 2.0 * self.lse_square_scale * g * lse
        if grad_lse is not None:
            e = e + torch.where(valid, grad_lse, 0.0)
        return torch.stack([a, e, u], dim=1)

    def mean_weights(self, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The weight :meth:`mean` puts on each token's kernel loss (without a separate
        z-loss): 1 over the scored targets' class weights or count, 0 where not scored."""
        weight = self.target_weight(targets, valid)
        mass = valid.sum() if weight is None else weight.sum()
        return valid.float() / torch.where(mass > 0, mass, 1)

    def mean(
        self, loss: torch.Tensor, z_loss: torch.Tensor | None, targets: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        """``reduction="mean"`` of per-token values: ``loss`` (the kernels' loss) divided by
        the scored targets' class weights (PyTorch's weighted mean) or their count, plus
        ``z_loss`` (the separate z-loss, or None) divided by the count (Liger's)."""
        count = valid.sum()
        weight = self.target_weight(targets, valid)
        mass = count if weight is None else weight.sum()
        out = loss.sum() / torch.where(mass > 0, mass, 1)
        if z_loss is not None:
            out = out + z_loss.sum() / count.clamp_min(1)
        return out


# Plain cross-entropy: every option off (the default of the functions that take terms).
PLAIN = LossTerms()
