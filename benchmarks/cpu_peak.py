"""CPU time and peak memory of the weighted loss: eager PyTorch, torch's chunked
``F.linear_cross_entropy`` and ours (``impl="torch"``), each in a fresh child process.

Peak memory is the growth of the child's peak resident set size (``ru_maxrss``) over
its value once the inputs exist, during the first forward+backward; time is the median
of the following repetitions.  Run: ``python -m benchmarks.cpu_peak``; results go to
``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import platform
import resource
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

CASES = ("eager", "torch_native", "hardfocus")


def _weighted(nll, targets, method):
    from hardfocus_fused import sequence_weights

    n_tokens = (targets != -100).sum(1)
    seq_loss = nll.sum(1) / n_tokens.clamp_min(1)
    return (sequence_weights(seq_loss, n_tokens, method=method) * seq_loss).sum()


def _loss_fn(case, hidden, weight, labels, method):
    from hardfocus_fused import hardfocus_loss

    batch, seq, size = hidden.shape
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)
    if case == "hardfocus":
        return lambda: hardfocus_loss(hidden, weight, labels, method=method, impl="torch")
    if case == "eager":
        def eager():
            logits = (hidden @ weight.T).float()
            nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
            return _weighted(nll, targets, method)
        return eager

    def native():
        nll = F.linear_cross_entropy(hidden.reshape(-1, size), weight, targets.reshape(-1), reduction="none",
                                     ignore_index=-100, options=torch.nn.LinearCrossEntropyOptions())
        return _weighted(nll.view(batch, seq).float(), targets, method)
    return native


def _child(case, shape, dtype, method, repeats, queue):
    torch.manual_seed(0)
    batch, seq, size, vocab = shape
    hidden = torch.randn(batch, seq, size).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, size) / size**0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (batch, seq))
    fn = _loss_fn(case, hidden, weight, labels, method)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn().backward()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    times = []
    for _ in range(repeats):
        hidden.grad = weight.grad = None
        start = time.perf_counter()
        fn().backward()
        times.append(time.perf_counter() - start)
    queue.put({"impl": case, "method": method, "ms": 1000 * statistics.median(times), "peak_mb": peak_kib / 1024})


def run(shape, dtype, method, repeats):
    ctx = mp.get_context("spawn")
    rows = []
    for case in CASES:
        if case == "torch_native" and not hasattr(F, "linear_cross_entropy"):
            continue
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(case, shape, dtype, method, repeats, queue))
        proc.start()
        rows.append(queue.get())
        proc.join()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="8,512,256,32000", help="B,T,H,V")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    shape = tuple(int(x) for x in args.shape.split(","))
    dtype = getattr(torch, args.dtype)
    rows = [r for method in ("irdro", "midranking") for r in run(shape, dtype, method, args.repeats)]
    batch, seq, size, vocab = shape
    result = {
        "device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "date": datetime.date.today().isoformat(), "torch": torch.__version__,
        "shape": {"B": batch, "T": seq, "H": size, "V": vocab}, "dtype": args.dtype,
        "memory": "peak RSS growth of a fresh child process during the first forward+backward",
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"cpu-{result['date']}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"CPU, {result['device']}, torch {result['torch']}, {result['date']}; "
             f"B={batch} T={seq} H={size} V={vocab} {args.dtype}, forward+backward", "",
             "| impl | method | ms (median) | peak extra MiB |", "|---|---|---:|---:|"]
    lines += [f"| {r['impl']} | {r['method']} | {r['ms']:.0f} | {r['peak_mb']:.0f} |" for r in rows]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
