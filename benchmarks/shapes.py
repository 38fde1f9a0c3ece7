"""Benchmark shapes and inputs: plain random, and "trained-like" logits.

Random hidden states and head give a near-uniform softmax (token loss ~ log V), unlike a
trained model, whose softmax mass sits on few tokens; that difference decides how much a
backward that skips negligible probabilities can save.  The trained-like case pulls each
hidden state toward its target's head row: ``h = noise + a_seq * alpha * W[target]``, with
one difficulty factor ``a_seq`` in [0.7, 1.3] per sequence (so IR-DRO has losses to weigh)
and ``alpha`` found by bisection so that the mean token loss is 2.5 nats.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Shape:
    name: str
    tokens: int
    hidden: int
    vocab: int
    seq_len: int = 1024

    @property
    def batch(self) -> int:
        return max(1, self.tokens // self.seq_len)


HEADS = {
    "gemma2-2b": Shape("gemma2-2b", 8192, 2304, 256000),
    "llama3-8b": Shape("llama3-8b", 16384, 4096, 128256),
    "opt-350m": Shape("opt-350m", 4096, 512, 50272),
}
SWEEP = [Shape(f"sweep-N{n}", n, 4096, 128256) for n in (1024, 2048, 4096, 8192, 16384, 32768)]
MID = Shape("mid", 2048, 1024, 32000)  # the accuracy comparison
CPU = Shape("cpu", 4096, 256, 32000, seq_len=512)  # what every machine here can run
TINY = Shape("tiny", 256, 64, 1000, seq_len=64)  # harness self-test
MICRO = Shape("micro", 32, 16, 64, seq_len=16)  # the harness's plumbing, in the interpreter
SHAPES = {s.name: s for s in [*HEADS.values(), *SWEEP, MID, CPU, TINY, MICRO]}
TARGET_NATS = 2.5


def _mean_nll(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> float:
    logits = hidden.float() @ weight.float().T
    return torch.nn.functional.cross_entropy(logits, targets).item()


def make_inputs(shape: Shape, data: str, dtype: torch.dtype, device: str, seed: int = 0):
    """``(hidden (B, T, H), weight (V, H), labels (B, T))``; hidden and weight need grad."""
    # Drawn on the target device (a GPU draws the head's 0.5 G values in milliseconds, a
    # CPU in seconds): the same seed gives the same inputs on one kind of device.
    gen = torch.Generator(device=device).manual_seed(seed)
    b, t = shape.batch, shape.tokens // shape.batch
    draw = dict(generator=gen, device=device)
    weight = torch.randn(shape.vocab, shape.hidden, **draw).div_(shape.hidden**0.5)
    labels = torch.randint(0, shape.vocab, (b, t), **draw)
    hidden = torch.randn(b, t, shape.hidden, **draw)
    if data == "trained-like":
        targets = torch.cat([labels[:, 1:], labels[:, :1]], dim=1)  # what each position predicts
        pull = weight[targets] * (0.7 + 0.6 * torch.rand(b, 1, 1, **draw))
        sample = torch.randperm(b * t, **draw)[:512]
        flat_h, flat_p, flat_t = hidden.view(-1, shape.hidden), pull.view(-1, shape.hidden), targets.view(-1)
        low, high = 0.0, 64.0
        for _ in range(30):
            alpha = (low + high) / 2
            nll = _mean_nll(flat_h[sample] + alpha * flat_p[sample], weight, flat_t[sample])
            low, high = (alpha, high) if nll > TARGET_NATS else (low, alpha)
        hidden = hidden + alpha * pull
    elif data != "random":
        raise ValueError(f"data must be 'random' or 'trained-like', got {data!r}")
    return (hidden.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_(), labels)


@functools.lru_cache(maxsize=1)
def _cached(shape: Shape, data: str, dtype: torch.dtype, device: str, seed: int):
    return tuple(t.detach() for t in make_inputs(shape, data, dtype, device, seed))


def fresh_inputs(shape: Shape, data: str, dtype: torch.dtype, device: str, seed: int = 0):
    """``make_inputs``, made once per case in a row of cases on one shape: new leaf tensors
    (their own ``.grad`` and ``requires_grad``) over the same data.  On a GPU, making the
    head's inputs costs seconds that the benchmark's device time is short of."""
    hidden, weight, labels = _cached(shape, data, dtype, device, seed)
    return hidden.detach().requires_grad_(), weight.detach().requires_grad_(), labels
