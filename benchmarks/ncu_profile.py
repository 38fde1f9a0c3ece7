"""One IR-DRO forward + backward on a benchmark head, for Nsight Compute to profile.

    ncu --clock-control none -k regex:'_lse_forward_kernel|_lce_backward_kernel' -c 3 \\
        --section SpeedOfLight --section Occupancy --csv python3 -m benchmarks.ncu_profile

(``bash benchmarks/gpu_session.sh profile`` runs exactly that and keeps the CSV.)  One
pass, no warm-up, so that the first matching launches are the ones profiled: in a session
the earlier stages have filled Triton's on-disk cache, and a compilation, if any, happens
before its launch, outside what ncu measures.  The CSV says where a missed target's time
goes: the forward's and the backward's SM and memory throughput and achieved occupancy,
as the hardware counters report them.
"""

from __future__ import annotations

import argparse

import torch

from hardfocus_fused import hardfocus_loss

from .shapes import SHAPES, make_inputs


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--method", default="irdro")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.ncu_profile needs a CUDA GPU")
    hidden, weight, labels = make_inputs(SHAPES[args.shape], "trained-like", torch.bfloat16, "cuda")
    loss = hardfocus_loss(hidden, weight, labels, method=args.method, impl="triton")
    loss.backward()
    torch.cuda.synchronize()
    print(f"{args.shape} {args.method}: loss {loss.item():.4f}", flush=True)


if __name__ == "__main__":
    main()
