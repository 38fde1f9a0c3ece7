"""Measure with what a sweep found fastest, inside the same device session.

A GPU session is short: the sweep (``benchmarks.sweep``) and the targets
(``benchmarks.targets --configs-from SWEEP.json``) run in one call, and the targets are
measured with the sweep's fastest configurations, so that the numbers published are those
of the defaults a later commit sets from the same JSON.  Nothing here changes
``kernels/config.py``: :func:`apply` sets measured defaults (``config.use_measured_configs``)
and the ``"auto"`` backward strategy (``op.dispatch.use_measured_backward``) in this process
only, for half-precision inputs on the swept heads
(matched by vocabulary and hidden size, any token count above the small-N rule's).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from hardfocus_fused.kernels.config import HeadConfigs, KernelConfig

from .shapes import SHAPES


@dataclass(frozen=True)
class HeadChoice:
    """On one head: the fastest forward config, the fastest ``"fused"`` backward config,
    the fastest ``"matmul"`` chunk budget, and the best backward time of each strategy
    (``bwd_ms``; a strategy that did not run is absent).  None: nothing of that kind ran."""

    head: str
    forward: KernelConfig | None
    backward: KernelConfig | None
    matmul_chunk_bytes: int | None
    fwd_ms: float | None
    bwd_ms: dict


def _fastest(rows: list[dict]) -> dict | None:
    timed = [r for r in rows if "ms" in r]
    return min(timed, key=lambda r: r["ms"]) if timed else None


def best(sweep: dict) -> list[HeadChoice]:
    """One ``HeadChoice`` per head of a ``benchmarks.sweep`` result."""
    choices = []
    for head in dict.fromkeys(r["head"] for r in sweep["rows"]):
        rows = [r for r in sweep["rows"] if r["head"] == head]
        fwd = _fastest([r for r in rows if r["pass"] == "fwd"])
        fused = _fastest([r for r in rows if r["pass"] == "bwd" and r["strategy"] == "fused"])
        matmul = _fastest([r for r in rows if r["pass"] == "bwd" and r["strategy"] == "matmul"])
        choices.append(
            HeadChoice(
                head,
                forward=KernelConfig(**fwd["params"]) if fwd else None,
                backward=KernelConfig(**fused["params"]) if fused else None,
                matmul_chunk_bytes=matmul["matmul_chunk_bytes"] if matmul else None,
                fwd_ms=fwd["ms"] if fwd else None,
                bwd_ms={name: row["ms"] for name, row in (("fused", fused), ("matmul", matmul)) if row},
            )
        )
    return choices


def strategy(choices: list[HeadChoice]) -> str:
    """The backward strategy with the least summed time over the heads where both ran
    (``"fused"`` when none did)."""
    both = [c.bwd_ms for c in choices if len(c.bwd_ms) == 2]
    if not both:
        return "fused"
    return min(("fused", "matmul"), key=lambda name: sum(ms[name] for ms in both))


@dataclass
class Applied:
    """What :func:`apply` replaced; ``undo()`` puts it back."""

    choices: list[HeadChoice]
    strategy: str
    undo_steps: list

    def undo(self) -> None:
        for step in reversed(self.undo_steps):
            step()
        self.undo_steps.clear()

    def describe(self) -> dict:
        return {
            "strategy": self.strategy,
            "heads": [
                {
                    "head": c.head,
                    "forward": c.forward and dataclasses.asdict(c.forward),
                    "backward": c.backward and dataclasses.asdict(c.backward),
                    "matmul_chunk_bytes": c.matmul_chunk_bytes,
                    "fwd_ms": c.fwd_ms,
                    "bwd_ms": c.bwd_ms,
                }
                for c in self.choices
            ],
        }


def apply(choices: list[HeadChoice]) -> Applied:
    """Use ``choices`` as the defaults in this process (see the module's docstring); the
    ``"auto"`` backward strategy becomes :func:`strategy`'s."""
    from hardfocus_fused.kernels import config
    from hardfocus_fused.op import dispatch

    by_head = {(SHAPES[c.head].vocab, SHAPES[c.head].hidden): c for c in choices if c.head in SHAPES}

    def tuned_configs(
        configs: HeadConfigs, n_tokens: int, n_vocab: int, n_hidden: int, dtype: torch.dtype
    ) -> HeadConfigs:
        choice = by_head.get((n_vocab, n_hidden))
        if choice is None or dtype == torch.float32 or n_tokens <= config.SMALL_N:
            return configs
        return dataclasses.replace(
            configs,
            forward=choice.forward or configs.forward,
            backward=choice.backward or configs.backward,
            matmul_chunk_bytes=choice.matmul_chunk_bytes or configs.matmul_chunk_bytes,
        )

    chosen = strategy(choices)
    previous_configs = config.use_measured_configs(tuned_configs)
    previous_backward = dispatch.use_measured_backward(chosen)
    return Applied(
        choices,
        chosen,
        [
            lambda: config.use_measured_configs(previous_configs),
            lambda: dispatch.use_measured_backward(previous_backward),
        ],
    )
