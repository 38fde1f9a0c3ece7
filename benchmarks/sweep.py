"""Kernel configurations x backward strategies on the benchmark heads, timed.

    python -m benchmarks.sweep --out DIR [--heads gemma2-2b,llama3-8b] [--budget-s 480]

On a GPU each case is timed with ``triton.testing.do_bench`` (median milliseconds); on
the CPU (``--heads tiny``, the harness self-test) with ``time.perf_counter``.  Inputs
are bf16 (fp32 on the CPU), trained-like, and every token has a non-zero upstream
gradient (IR-DRO's case; the backward's cost does not depend on the coefficients'
values).  Cases, per head:

- ``fwd`` for each forward candidate in ``FORWARD`` (the default first);
- ``bwd`` (the backward alone, on a retained graph) for each backward candidate in
  ``BACKWARD`` with the ``"fused"`` strategy, and for the ``"matmul"`` strategy at each
  chunk budget in ``MATMUL_CHUNKS``.

``DIR/sweep-<device>-<date>.json`` is rewritten after every case, so a run stopped by its
time limit keeps what it measured; ``--budget-s`` stops starting new cases after that
many seconds.  Each row: ``{"head", "pass", "strategy", "config", "ms", "tflops"}`` or an
``"error"``, with the candidate's ``KernelConfig`` fields as ``"params"`` (or the
``"matmul_chunk_bytes"`` of a ``"matmul"`` row).  The fastest row per (head, pass) is what
the defaults in ``kernels/config.py`` should become; nothing here changes them
(``benchmarks.tuned`` applies them within one process, for ``benchmarks.targets``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import statistics
import time
from pathlib import Path

import torch

from hardfocus_fused.kernels.config import HeadConfigs, KernelConfig, default_configs
from hardfocus_fused.op.dispatch import token_nll

from .peers import shifted
from .shapes import SHAPES, make_inputs

K = KernelConfig
# Candidates (bf16), the default first; each compiles for sm_90 without spills at the
# Llama-3-8B head (tests/kernels/test_compile.py; 64 x 128 x 64 at 4 warps and 4 stages did not).
FORWARD = (
    None,
    K(block_n=128, block_v=128, block_h=64, num_warps=8, num_stages=4),
    K(block_n=128, block_v=128, block_h=64, num_warps=8, num_stages=3, group_n=1),
    K(block_n=128, block_v=256, block_h=64, num_warps=8, num_stages=3),
    K(block_n=64, block_v=256, block_h=64, num_warps=8, num_stages=3),
    K(block_n=128, block_v=128, block_h=32, num_warps=8, num_stages=5),
)
BACKWARD = (
    None,
    K(block_n=128, block_v=128, block_h=64, num_warps=8, num_stages=3, group_n=1),
    K(block_n=128, block_v=128, block_h=32, num_warps=8, num_stages=4),
    K(block_n=64, block_v=128, block_h=64, num_warps=8, num_stages=3),
    K(block_n=128, block_v=64, block_h=64, num_warps=8, num_stages=3),
)
MATMUL_CHUNKS = (256 * 2**20, 1024 * 2**20)


def cases(defaults: HeadConfigs) -> list[tuple[str, str, HeadConfigs, str]]:
    """``(pass, strategy, configs, label)`` for one head."""
    out = []
    for candidate in FORWARD:
        configs = defaults if candidate is None else dataclasses.replace(defaults, forward=candidate)
        out.append(("fwd", "-", configs, _label(configs.forward, candidate is None)))
    for candidate in BACKWARD:
        configs = defaults if candidate is None else dataclasses.replace(defaults, backward=candidate)
        out.append(("bwd", "fused", configs, _label(configs.backward, candidate is None)))
    for chunk in MATMUL_CHUNKS:
        configs = dataclasses.replace(defaults, matmul_chunk_bytes=chunk)
        out.append(("bwd", "matmul", configs, f"chunk {chunk // 2**20} MiB"))
    return out


def _label(config: KernelConfig, default: bool) -> str:
    c = config
    text = f"{c.block_n}x{c.block_v}x{c.block_h} w{c.num_warps} s{c.num_stages} g{c.group_n}"
    return text + (" (default)" if default else "")


def _timer(device: str):
    if device == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100)

    def cpu(fn, iters=3):
        fn()
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - start))
        return statistics.median(times)

    return cpu


def run_head(head: str, device: str, dtype: torch.dtype, timer, record, deadline: float) -> None:
    shape = SHAPES[head]
    hidden, weight, labels = make_inputs(shape, "trained-like", dtype, device)
    flat, targets = hidden.reshape(-1, shape.hidden), shifted(labels).reshape(-1)
    coef = (targets != -100).float() / max(1, int((targets != -100).sum()))
    defaults = default_configs(flat.shape[0], shape.vocab, shape.hidden, dtype)
    for kind, strategy, configs, label in cases(defaults):
        if time.monotonic() > deadline:
            record({"head": head, "pass": kind, "strategy": strategy, "config": label, "error": "time budget"})
            continue
        row = {"head": head, "pass": kind, "strategy": strategy, "config": label}
        if strategy == "matmul":
            row["matmul_chunk_bytes"] = configs.matmul_chunk_bytes
        else:
            row["params"] = dataclasses.asdict(configs.forward if kind == "fwd" else configs.backward)
        try:
            backward = strategy if strategy != "-" else "fused"

            def forward(configs=configs, backward=backward):
                return token_nll(
                    flat, weight, targets, None, -100, None, "triton", kernel_config=configs, backward_impl=backward
                )

            if kind == "fwd":
                ms = timer(forward)
                products = 1
            else:
                nll = forward()
                ms = timer(lambda nll=nll: torch.autograd.grad(nll, (flat, weight), coef, retain_graph=True))
                products = 3
            row.update(ms=ms, tflops=products * 2 * shape.tokens * shape.hidden * shape.vocab / (ms * 1e-3) / 1e12)
        except Exception as error:  # a candidate that fails is recorded, the sweep goes on
            row["error"] = f"{type(error).__name__}: {error}"[:300]
        record(row)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--heads", default="llama3-8b,gemma2-2b")
    parser.add_argument("--budget-s", type=float, default=480.0)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    result = {
        "device": name,
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "dtype": str(dtype),
        "rows": [],
    }
    path = Path(args.out) / f"sweep-{'gpu' if device == 'cuda' else 'cpu'}-{result['date']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)

    def record(row: dict) -> None:
        result["rows"].append(row)
        path.write_text(json.dumps(result, indent=1))
        print(json.dumps(row), flush=True)

    deadline = time.monotonic() + args.budget_s
    for head in args.heads.split(","):
        run_head(head, device, dtype, _timer(device), record, deadline)
    return result


if __name__ == "__main__":
    main()
