"""Running averages of the weighting's statistics between two logs, for training and for
evaluation separately (what :class:`~hardfocus_fused.hf.trainer.HardFocusCallback`
writes into the Trainer's logs).  Values are kept as 0-dim tensors: no host
synchronisation until they are read."""

from __future__ import annotations

import torch

from ..loss import HardFocusStats


def log_tensors(stats: HardFocusStats) -> dict[str, torch.Tensor]:
    """The statistics worth logging per step, as 0-dim tensors (no host sync): max weight,
    effective sample size ``1 / sum w^2``, and the mean, max and weighted sequence loss
    over the sequences that have targets (all 0 for a batch without any)."""
    live = stats.n_tokens > 0
    w = stats.weights.float()
    seq = stats.seq_loss.float()
    n_live = live.sum().clamp_min(1)
    return {
        "hardfocus/max_weight": w.max() if w.numel() else w.new_zeros(()),
        "hardfocus/ess": torch.where(live.any(), 1.0 / (w * w).sum().clamp_min(1e-30), 0.0),
        "hardfocus/seq_loss_mean": (seq * live).sum() / n_live,
        "hardfocus/seq_loss_max": torch.where(live, seq, 0.0).max() if seq.numel() else seq.new_zeros(()),
        "hardfocus/weighted_loss": (w * seq).sum(),
    }


def log_values(stats: HardFocusStats) -> dict[str, float]:
    """:func:`log_tensors` as Python floats."""
    return {key: value.item() for key, value in log_tensors(stats).items()}


class StatsLog:
    """Sums of :func:`log_tensors` over the loss calls since the last :meth:`pop`."""

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0

    def record(self, stats: HardFocusStats) -> None:
        for key, value in log_tensors(stats).items():
            self._sums[key] = self._sums.get(key, 0.0) + value
        self._count += 1

    def pop(self) -> dict[str, float]:
        """The averages since the previous call (empty when nothing was recorded)."""
        values = {k: (v / self._count).item() for k, v in self._sums.items()} if self._count else {}
        self._sums, self._count = {}, 0
        return values
