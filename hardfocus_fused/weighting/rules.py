"""Weighting rules as plug-ins, written with the public API.

``method=`` of :func:`~hardfocus_fused.hardfocus_loss` (and ``HardFocusLoss``,
``apply_hardfocus``) takes a built-in method's name or a *rule*: a callable

    rule(seq_loss, n_tokens) -> weights                      (B,) each

(``seq_loss`` detached; ``n_tokens`` the scored tokens per sequence; weights are
constants for autograd, usually summing to 1), optionally with a token-level method

    rule.token_weights(token_loss, scored) -> (B, T) weights  or None

called first with the detached per-token losses (0 where not scored, position t holding
the loss of predicting ``labels[:, t + 1]``) and the mask of scored positions; its weights
multiply each token's loss (and the data's ``token_weight``), and a sequence's mean
divides by their sum, so 0 drops a token.  ``hardfocus_fused.weighting.accumulate`` has rules that
weigh a whole gradient-accumulation step; this module has :class:`Rule`, a base class,
and two token-level rules: :class:`ExcessLoss` (Rho-1's selection) and :class:`DFT`
(dynamic fine-tuning).
"""

from __future__ import annotations

import math

import torch

from .methods import sequence_weights


class Rule:
    """Base for plug-in rules: a built-in method for the sequence weights (``"mean"`` by
    default: the token mean of whatever tokens remain) and no token weights; override
    either."""

    def __init__(self, method: str = "mean", **options) -> None:
        self.method, self.options = method, options

    def token_weights(self, token_loss: torch.Tensor, scored: torch.Tensor) -> torch.Tensor | None:
        return None

    def __call__(self, seq_loss: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
        return sequence_weights(seq_loss, n_tokens, method=self.method, **self.options)


class ExcessLoss(Rule):
    """Rho-1's selective language modelling (Lin et al., 2024): train on the tokens whose
    loss most exceeds a reference model's.

    Set ``rule.reference`` to the reference model's per-token loss for the batch before
    each loss call (a (B, T) tensor aligned like ``token_loss``, e.g.
    ``linear_cross_entropy(ref_hidden, ref_head, labels, shift=True, reduction="none")`` under
    ``torch.no_grad()``).  The ``keep`` fraction of the batch's scored tokens with the
    largest ``token_loss - reference`` get weight 1, the others 0 (ties by position); then
    the sequences are weighted by ``method`` (``"mean"``: the token mean over the kept
    tokens, Rho-1's loss).
    """

    def __init__(self, keep: float = 0.6, method: str = "mean", **options) -> None:
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"keep must be in (0, 1], got {keep}")
        super().__init__(method, **options)
        self.keep = keep
        self.reference: torch.Tensor | None = None

    def token_weights(self, token_loss: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
        if self.reference is None or self.reference.shape != token_loss.shape:
            raise ValueError(
                f"ExcessLoss: set rule.reference to the reference model's per-token loss, shaped like "
                f"the batch's token losses {tuple(token_loss.shape)}, before each loss call"
            )
        excess = torch.where(scored, token_loss - self.reference.to(token_loss), float("-inf")).flatten()
        n_keep = math.ceil(self.keep * int(scored.sum()))
        chosen = torch.zeros_like(excess)
        chosen[torch.sort(excess, descending=True, stable=True).indices[:n_keep]] = 1.0
        return chosen.view_as(token_loss)


class DFT(Rule):
    """Dynamic fine-tuning (Wu et al., 2025): each token's loss scaled by the detached
    probability of its target, ``sg(p_t) * nll_t``, averaged over the batch's scored
    tokens (so the gradient is that of the token mean of ``-sg(p_t) log p_t``).

    ``p_t = exp(-nll_t)`` comes from the per-token losses the fused forward already has: no
    extra pass.  The sequence weights undo the per-sequence normalisation by the token
    weights' sum, so the result is the plain token mean, as DFT defines it.
    """

    def __init__(self) -> None:
        super().__init__("mean")
        self._mass: torch.Tensor | None = None

    def token_weights(self, token_loss: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
        weights = torch.where(scored, torch.exp(-token_loss), 0.0)
        self._mass = weights.sum(dim=1)  # each sequence's sum of the token weights
        return weights

    def __call__(self, seq_loss: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
        if self._mass is None or self._mass.shape != seq_loss.shape:
            raise ValueError(
                "DFT's sequence weights follow its token weights in the same loss call; call it through "
                "hardfocus_loss(..., method=DFT())"
            )
        mass, self._mass = self._mass, None
        # seq_loss_i = sum_t p_t nll_t / mass_i, so mass_i / (scored tokens) gives the token mean.
        return mass.to(seq_loss.dtype) / n_tokens.sum().clamp_min(1).to(seq_loss.dtype)
