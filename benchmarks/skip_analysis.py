"""Would skipping negligible backward tiles save work, and at what accuracy cost?

``python -m benchmarks.skip_analysis [--shape mid]`` computes, in fp64 on the CPU with the
logits materialised, ``dlogits = softmax(z) - onehot(target)`` for the benchmark's
trained-like inputs and, for each threshold ``eps``, drops every ``block_n x block_v``
tile whose largest ``|dlogits|`` is below ``eps`` (what a kernel would skip).  It prints
the share of tiles kept and the error this causes in both gradients (norm and max,
relative to the exact gradient).  The coefficient of a token scales its row uniformly, so
it does not change which tiles a relative threshold drops and is left out.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from .peers import shifted
from .shapes import SHAPES, Shape, make_inputs


def tile_max(values: torch.Tensor, block_n: int, block_v: int) -> torch.Tensor:
    """Max of ``values`` over each ``block_n x block_v`` tile (ragged edges padded with 0)."""
    n, v = values.shape
    padded = torch.nn.functional.pad(values, (0, (-v) % block_v, 0, (-n) % block_n))
    rows, cols = padded.shape[0] // block_n, padded.shape[1] // block_v
    return padded.view(rows, block_n, cols, block_v).amax(dim=(1, 3))


def analyse(shape: Shape, block_n: int, block_v: int, thresholds: list[float]) -> list[dict]:
    hidden, weight, labels = make_inputs(shape, "trained-like", torch.float64, "cpu")
    hidden, weight = hidden.detach().reshape(-1, hidden.shape[-1]), weight.detach()
    targets = shifted(labels).reshape(-1)
    hidden, targets = hidden[targets != -100], targets[targets != -100]
    dlogits = torch.softmax(hidden @ weight.T, dim=1)
    dlogits[torch.arange(len(targets)), targets] -= 1
    exact = (dlogits @ weight, dlogits.T @ hidden)
    biggest = tile_max(dlogits.abs(), block_n, block_v)
    rows = []
    for eps in thresholds:
        kept = biggest >= eps
        mask = kept.repeat_interleave(block_n, 0).repeat_interleave(block_v, 1)[: dlogits.shape[0], : dlogits.shape[1]]
        kept_dlogits = dlogits * mask
        approx = (kept_dlogits @ weight, kept_dlogits.T @ hidden)
        row = {"eps": eps, "tiles_kept": kept.double().mean().item()}
        for name, a, e in zip(("grad_hidden", "grad_weight"), approx, exact):
            row[f"{name}_err_norm"] = ((a - e).norm() / e.norm()).item()
            row[f"{name}_err_max"] = ((a - e).abs().max() / e.abs().max()).item()
        rows.append(row)
    return rows


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="mid", choices=sorted(SHAPES))
    p.add_argument("--tokens", type=int, default=None, help="fewer tokens than the shape's (fp64 logits)")
    p.add_argument("--block-n", type=int, default=64)
    p.add_argument("--block-v", type=int, default=128)
    p.add_argument("--log2-eps", type=int, nargs="+", default=[-8, -12, -16, -20])
    args = p.parse_args(argv)
    shape = SHAPES[args.shape]
    if args.tokens:
        shape = dataclasses.replace(shape, tokens=args.tokens, seq_len=min(shape.seq_len, args.tokens))
    rows = analyse(shape, args.block_n, args.block_v, [2.0**e for e in args.log2_eps])
    print(
        f"shape {args.shape} (N={shape.tokens}, H={shape.hidden}, V={shape.vocab}), trained-like, "
        f"tiles {args.block_n} x {args.block_v}, fp64"
    )
    print("| eps | tiles kept | grad_hidden err (norm / max) | grad_weight err (norm / max) |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(
            f"| 2^{round(torch.log2(torch.tensor(r['eps'])).item())} | {r['tiles_kept']:.3f} | "
            f"{r['grad_hidden_err_norm']:.1e} / {r['grad_hidden_err_max']:.1e} | "
            f"{r['grad_weight_err_norm']:.1e} / {r['grad_weight_err_max']:.1e} |"
        )
    return rows


if __name__ == "__main__":
    main()
