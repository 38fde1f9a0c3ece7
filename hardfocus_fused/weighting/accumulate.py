"""Global-batch weighting across gradient-accumulation micro-batches.

Per-micro-batch weights (what a plain accumulation loop gets) are a different objective
from the paper's weights over the whole step's batch.  Both helpers here are weighting
rules: pass one as ``method=`` to :func:`hardfocus_loss`, :class:`HardFocusLoss` or
:func:`apply_hardfocus`, and call ``reset()`` before each optimizer step's first
micro-batch (``hardfocus_fused.hf.trainer.AccumulationCallback`` does that under the
``transformers.Trainer``).

- :class:`AccumulatedIRDRO`: exact IR-DRO over all K micro-batches with one forward and
  backward each and no graph kept alive.  It runs an online softmax: a running max ``m``
  and normaliser ``S`` of ``exp(L_i / r)``; when a micro-batch moves them, the gradients
  accumulated so far are rescaled (``.grad *= S_old exp(m_old - m) / S``) before its
  backward adds ``exp(L_i / r - m) / S`` times its own.  After the last micro-batch the
  ``.grad`` of every parameter is exactly ``sum_i softmax(L / r)_i grad L_i`` over the
  step, so gradient clipping and the optimizer see the final values.  The parameters'
  gradients must come only from this loss.
- :class:`TwoPassRanking`: MidRanking (or High/LowRanking) needs every loss of the step
  before any weight is known.  First pass: a no-grad forward of each micro-batch inside
  ``with ranking.observing():`` records the losses; second pass: forward and backward of
  the same micro-batches in the same order get their global weights.  The cost is one
  extra forward per micro-batch, about a third more compute than plain training.

With a ``group`` (data parallel), the losses are the whole group's for each micro-batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch

from .methods import sequence_weights


class AccumulatedIRDRO:
    """IR-DRO weights over every micro-batch of an optimizer step (online softmax)."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter], r: float = 10.0) -> None:
        if not r > 0:
            raise ValueError(f"r must be > 0, got {r}")
        self.parameters = [p for p in parameters if p.requires_grad]
        self.r = float(r)
        self.reset()

    def reset(self) -> None:
        """Start a new optimizer step (call before its first micro-batch)."""
        self.max: torch.Tensor | None = None
        self.total: torch.Tensor | None = None

    def batch_options(self) -> dict:
        """The per-batch method this rule extends (used where no step is accumulated:
        evaluation under ``apply_hardfocus``)."""
        return {"method": "irdro", "r": self.r}

    def __call__(self, seq_loss: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
        live = n_tokens > 0
        z = torch.where(live, seq_loss.detach().float() / self.r, float("-inf"))
        batch_max = z.max() if z.numel() else z.new_tensor(float("-inf"))
        if self.max is None:
            new_max = batch_max
        else:
            new_max = torch.maximum(self.max, batch_max)
        new_max = torch.where(torch.isfinite(new_max), new_max, 0.0)  # no live sequence yet
        terms = torch.exp(z - new_max)  # 0 for sequences without targets
        total = terms.sum()
        if self.total is not None:
            carried = self.total * torch.exp(self.max - new_max)
            total = total + carried
            factor = torch.where(total > 0, carried / total, 1.0)
            with torch.no_grad():
                for p in self.parameters:
                    if p.grad is not None:
                        p.grad.mul_(factor)
        self.max, self.total = new_max, total
        return torch.where(total > 0, terms / total, 0.0)


class TwoPassRanking:
    """Ranking weights (``"midranking"``, ``"highranking"``, ``"lowranking"``) over every
    micro-batch of a step, from a no-grad first pass."""

    def __init__(self, method: str = "midranking", n1: float = 0.25, n2: float = 0.25) -> None:
        if method not in ("midranking", "highranking", "lowranking"):
            raise ValueError(f"method must be 'midranking', 'highranking' or 'lowranking', got {method!r}")
        self.method, self.n1, self.n2 = method, n1, n2
        self.reset()

    def batch_options(self) -> dict:
        """The per-batch method this rule extends (see ``AccumulatedIRDRO.batch_options``)."""
        return {"method": self.method, "n1": self.n1, "n2": self.n2}

    def reset(self) -> None:
        self._observed: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._weights: list[torch.Tensor] | None = None
        self._next = 0
        self._observing = False

    @contextlib.contextmanager
    def observing(self):
        """First pass: record each micro-batch's losses (the returned loss is meaningless)."""
        self.reset()
        self._observing = True
        try:
            yield self
        finally:
            self._observing = False

    def __call__(self, seq_loss: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
        if self._observing:
            self._observed.append((seq_loss.detach().float(), n_tokens))
            return torch.zeros_like(seq_loss, dtype=torch.float32)
        if self._weights is None:
            if not self._observed:
                raise RuntimeError("TwoPassRanking: run the first pass inside `with ranking.observing():` first")
            losses, counts = (torch.cat(parts) for parts in zip(*self._observed))
            weights = sequence_weights(losses, counts, method=self.method, n1=self.n1, n2=self.n2)
            self._weights = list(weights.split([loss.numel() for loss, _ in self._observed]))
        if self._next >= len(self._weights):
            raise RuntimeError(
                f"TwoPassRanking: more micro-batches in the second pass than the "
                f"{len(self._weights)} observed in the first"
            )
        weights = self._weights[self._next]
        if weights.numel() != seq_loss.numel():
            raise RuntimeError("TwoPassRanking: the second pass must repeat the first pass's micro-batches in order")
        self._next += 1
        return weights
