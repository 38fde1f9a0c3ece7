"""Small demonstration: the IR-DRO loss and its gradients on a random LM head.

``python -m hardfocus_fused.demo`` runs on a CPU in seconds.  It computes the weighted
loss with the fused op, checks it and the gradients against eager PyTorch (which does
materialise the logits), and prints the loss, the sequence weights and how much memory the
logits would have taken.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from ..loss import hardfocus_loss
from ..weighting.methods import METHODS


def eager_loss(hidden, weight, labels, method_weights):
    """What one would write without this package: full logits, then the weighted sum."""
    logits = (hidden @ weight.T).float()
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none")
    n_tokens = (labels[:, 1:] != -100).sum(1)
    seq_loss = nll.sum(1) / n_tokens.clamp_min(1)
    return (method_weights * seq_loss).sum()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="irdro", choices=METHODS)
    parser.add_argument("--r", type=float, default=10.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--impl", default="auto", choices=("auto", "triton", "torch"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(args.seed)
    batch, seq_len = args.batch_size, args.seq_len
    weight = torch.randn(args.vocab, args.hidden, generator=gen) / args.hidden**0.5
    labels = torch.randint(0, args.vocab, (batch, seq_len), generator=gen)
    for i in range(batch):
        labels[i, : i * seq_len // (4 * batch)] = -100  # left padding, ragged
    # Sequences of different difficulty: hidden states of sequence i are pulled towards
    # the rows of their next tokens with strength 12 i / B, so its loss falls with i.
    targets = torch.cat([labels[:, 1:], labels[:, :1]], 1).clamp_min(0)
    strength = 12.0 * torch.arange(batch).view(batch, 1, 1) / batch
    hidden = torch.randn(batch, seq_len, args.hidden, generator=gen) + strength * weight[targets]
    hidden, weight = hidden.to(device).requires_grad_(), weight.to(device).requires_grad_()
    labels = labels.to(device)

    start = time.perf_counter()
    loss, stats = hardfocus_loss(
        hidden, weight, labels, method=args.method, r=args.r, impl=args.impl, return_stats=True
    )
    loss.backward()
    elapsed = time.perf_counter() - start
    grads = hidden.grad.clone(), weight.grad.clone()

    hidden.grad = weight.grad = None
    start = time.perf_counter()
    reference = eager_loss(hidden, weight, labels, stats.weights)
    reference.backward()
    eager_elapsed = time.perf_counter() - start
    n_tokens = int(stats.n_tokens.sum())
    logits_mib = args.batch_size * args.seq_len * args.vocab * 4 / 2**20

    print(
        f"hardfocus-fused demo on {device}: B={args.batch_size} T={args.seq_len} H={args.hidden} "
        f"V={args.vocab}, method={args.method}, r={args.r}"
    )
    print(f"loss            {loss.item():.6f}   (eager PyTorch: {reference.item():.6f})")
    print(f"seq loss        {' '.join(f'{v:.3f}' for v in stats.seq_loss.tolist())}")
    print(f"weights         {' '.join(f'{v:.3f}' for v in stats.weights.tolist())}")
    print(f"target tokens   {n_tokens} of {args.batch_size * args.seq_len}")
    print(
        f"max |grad diff| hidden {(grads[0] - hidden.grad).abs().max().item():.2e}, "
        f"weight {(grads[1] - weight.grad).abs().max().item():.2e} (vs eager)"
    )
    print(
        f"forward+backward {elapsed * 1000:.0f} ms fused, {eager_elapsed * 1000:.0f} ms eager (one run, "
        f"not a benchmark; see benchmarks/)"
    )
    print(
        f"the fp32 logits the fused loss never allocated would take {logits_mib:.0f} MiB, "
        f"and as much again for their gradient"
    )


if __name__ == "__main__":
    main()
