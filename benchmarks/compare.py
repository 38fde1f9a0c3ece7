"""Side-by-side benchmark of the weighted loss: time, peak extra memory, TFLOP/s, accuracy.

``python -m benchmarks.compare`` measures, in one run, every implementation in
``peers.IMPLS`` on the chosen shapes, data kinds, methods and passes, and writes
``<out>/<device>-<date>.json`` (the schema below), a markdown table and PNG plots.

- Time: median of ``--iters`` iterations after two warm-up calls; CUDA events on a GPU,
  ``time.perf_counter`` on the CPU.  ``bwd`` is the backward alone, timed after an untimed
  forward.
- Peak extra memory: on a GPU, ``torch.cuda.max_memory_allocated`` above what is allocated
  once the inputs exist (gradients included).  On the CPU, the growth of the peak resident
  set (``ru_maxrss``) of a fresh child process during one ``fwd`` (one child) or one
  ``fwd+bwd`` call (another child), after a tiny warm-up call; ``bwd`` reports the
  ``fwd+bwd`` peak.  Timing runs in a third child.
- TFLOP/s: useful matmul work over time, ``2 N H V`` per matmul: 1 for ``fwd``, 2 for
  ``bwd``, 3 for ``fwd+bwd``; ``matmul_tflops`` is a dense matmul measured in the same run.
- Frozen head (``--heads frozen``): the weight does not require grad, so ``bwd`` computes
  only the hidden-state gradient.
- Accuracy: for the shapes in ``--accuracy-shapes`` (trainable head), ``err_loss``, ``err_grad_hidden`` and
  ``err_grad_weight`` (max abs error / max abs reference) against eager PyTorch in fp64 on
  the same inputs, added to the ``fwd+bwd`` rows.

JSON: ``{"device", "date", "torch", "triton", "matmul_tflops", "notes", "memory", "rows": [
{"impl", "method", "shape", "data", "head", "pass", "ms", "peak_mb", "tflops", [err_*]}]}``.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import multiprocessing as mp
import resource
import statistics
import time
from pathlib import Path

import torch

from .peers import IMPLS, _eager, loss_fn, shifted, unavailable
from .shapes import HEADS, SHAPES, SWEEP, fresh_inputs, make_inputs

PASSES = ("fwd", "bwd", "fwd+bwd")
MATMULS = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}
HEADS_GRAD = ("trainable", "frozen")


def matmuls(kind: str, head: str) -> int:
    """``N x H x V`` products in a pass: the frozen head's backward skips ``grad_weight``."""
    return MATMULS[kind] - (kind != "fwd" and head == "frozen")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _clock(device: str):
    """``(start, stop)``: stop() returns milliseconds since start()."""
    if device == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        return begin.record, lambda: (end.record(), end.synchronize(), begin.elapsed_time(end))[-1]
    box = {}
    return (lambda: box.__setitem__("t", time.perf_counter()), lambda: 1000 * (time.perf_counter() - box["t"]))


def time_pass(fn, tensors, kind: str, iters: int, device: str) -> float:
    """Median milliseconds of one pass."""
    times = []
    for _ in range(iters):
        for t in tensors:
            t.grad = None
        start, stop = _clock(device)
        if kind == "bwd":
            loss = fn()
            _sync(device)
            start()
            loss.backward()
        else:
            start()
            loss = fn()
            if kind == "fwd+bwd":
                loss.backward()
        times.append(stop())
        del loss
    return statistics.median(times)


def cuda_peak_mb(fn, tensors, kind: str) -> float:
    for t in tensors:
        t.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    loss = fn() if kind == "bwd" else None  # bwd: what the forward keeps counts, its own peak does not
    torch.cuda.reset_peak_memory_stats()
    if loss is None:
        loss = fn()
    if kind != "fwd":
        loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del loss
    return peak / 2**20


def accuracy(impl: str, hidden, weight, labels, method: str) -> dict:
    """Relative errors of the loss and both gradients against eager PyTorch in fp64."""
    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    ref = _eager(h64, w64, shifted(labels), method)
    ref_grads = torch.autograd.grad(ref, (h64, w64))
    loss = loss_fn(impl, hidden, weight, labels, method)()
    grads = torch.autograd.grad(loss, (hidden, weight))

    def err(a, b):
        return ((a.double() - b).abs().max() / b.abs().max()).item()

    return {
        "err_loss": err(loss, ref),
        "err_grad_hidden": err(grads[0], ref_grads[0]),
        "err_grad_weight": err(grads[1], ref_grads[1]),
    }


def cpu_peak_mb(fn, kind: str) -> float:
    """Growth of this process's peak RSS during one ``kind`` call (call it in a fresh process)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    loss = fn()
    if kind != "fwd":
        loss.backward()
    del loss
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


def measure(
    impl, method, shape_name, data, head, dtype, device, iters, with_accuracy, cpu_peak_pass=None
) -> list[dict]:
    """Rows for every pass of one case.  With ``cpu_peak_pass`` (CPU, in a fresh process):
    only that pass's peak RSS growth, as ``{"peak_mb": ...}`` in a one-element list."""
    shape = SHAPES[shape_name]
    hidden, weight, labels = fresh_inputs(shape, data, dtype, device)
    if head == "frozen":
        weight.requires_grad_(False)
    tensors = (hidden, weight)
    fn = loss_fn(impl, hidden, weight, labels, method)
    if cpu_peak_pass is not None:
        warm = make_inputs(SHAPES["tiny"], "random", dtype, device)  # lazy library set-up, not the case's
        loss_fn(impl, *warm, method)().backward()
        return [{"peak_mb": cpu_peak_mb(fn, cpu_peak_pass)}]
    for _ in range(2):  # warm-up (compilation, autotuning, caches)
        fn().backward()
    rows = []
    for kind in PASSES:
        ms = time_pass(fn, tensors, kind, iters, device)
        flops = matmuls(kind, head) * 2 * shape.tokens * shape.hidden * shape.vocab
        rows.append(
            {
                "impl": impl,
                "method": method,
                "shape": shape_name,
                "data": data,
                "head": head,
                "pass": kind,
                "ms": ms,
                "peak_mb": cuda_peak_mb(fn, tensors, kind) if device == "cuda" else None,
                "tflops": flops / (ms * 1e-3) / 1e12,
            }
        )
    if with_accuracy and head == "trainable":
        rows[-1].update(accuracy(impl, hidden, weight, labels, method))
    return rows


def measure_cpu(*case) -> list[dict] | str:
    """``measure`` on the CPU: timing in one fresh process, each peak in another."""
    rows = measure_isolated(*case)
    if isinstance(rows, str):
        return rows
    peaks = {}
    for kind in ("fwd", "fwd+bwd"):
        got = measure_isolated(*case, kind)
        if isinstance(got, str):
            return got
        peaks[kind] = got[0]["peak_mb"]
    peaks["bwd"] = peaks["fwd+bwd"]
    for row in rows:
        row["peak_mb"] = peaks[row["pass"]]
    return rows


def _child(queue, *args):
    try:
        queue.put(measure(*args))
    except Exception as err:  # reported as a note, the run goes on
        queue.put(f"{type(err).__name__}: {err}")


def measure_isolated(*args) -> list[dict] | str:
    """``measure`` in a fresh process (CPU peak memory needs one per case)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, *args))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def matmul_tflops(dtype: torch.dtype, device: str) -> float:
    """Dense ``n x n x n`` matmul rate in TFLOP/s (median of 20; 8192 on GPU, 1024 on CPU)."""
    n = 8192 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(20):
        start, stop = _clock(device)
        start()
        a @ b
        times.append(stop())
    return 2 * n**3 / (statistics.median(times) * 1e-3) / 1e12


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    import platform

    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def new_result(args: argparse.Namespace) -> dict:
    """The result's header (device, versions, date, dense matmul rate), no rows yet."""
    device, dtype = args.device, getattr(torch, args.dtype)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(device),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton_version,
        "dtype": args.dtype,
        "matmul_tflops": matmul_tflops(dtype, device),
        "iters": args.iters,
        "memory": (
            "torch.cuda.max_memory_allocated above the inputs"
            if device == "cuda"
            else "peak RSS growth of a fresh child process per pass; bwd reports the fwd+bwd peak"
        ),
        "notes": [],
        "rows": [],
    }


def run(args: argparse.Namespace, cases=None, on_case=None) -> dict:
    """Measure ``cases``, each ``(impl, method, shape, data, head)`` (default: every
    combination of the options in ``args``), in the order given; ``on_case(result)`` is
    called after each case (to write what was measured so far)."""
    if cases is None:
        cases = (
            (impl, method, shape, data, head)
            for impl, shape, data, method, head in itertools.product(
                args.impls, args.shapes, args.data, args.methods, args.heads
            )
        )
    cases = list(cases)
    why_not = {impl: unavailable(impl, args.device) for impl in dict.fromkeys(key[0] for key in cases)}
    result = new_result(args)
    result["notes"] += [f"skipped {impl}: {why}" for impl, why in why_not.items() if why]
    deadline = None if args.budget_s is None else time.monotonic() + args.budget_s
    for key in cases:
        if why_not[key[0]]:
            continue
        if deadline is not None and time.monotonic() > deadline:
            result["notes"].append(f"{' '.join(key)}: not measured (time budget of {args.budget_s:g} s spent)")
            continue
        case = (*key, getattr(torch, args.dtype), args.device, args.iters, key[2] in args.accuracy_shapes)
        rows = measure_cpu(*case) if args.device == "cpu" else _guarded(case)
        if isinstance(rows, str):
            result["notes"].append(f"{' '.join(key)}: {rows}")
        else:
            result["rows"] += rows
            if not args.quiet:
                for r in rows:
                    print(
                        f"{' '.join(key):55s} {r['pass']:7s} {r['ms']:9.2f} ms {r['peak_mb']:9.1f} MiB "
                        f"{r['tflops']:7.2f} TFLOP/s",
                        flush=True,
                    )
        if on_case is not None:
            on_case(result)
    return result


def _guarded(case) -> list[dict] | str:
    try:
        return measure(*case)
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def parse_args(argv=None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--dtype", default="bfloat16" if cuda else "float32")
    p.add_argument("--impls", nargs="+", default=list(IMPLS) if cuda else ["eager", "torch_native", "hardfocus"])
    p.add_argument("--shapes", nargs="+", default=[*HEADS, *(s.name for s in SWEEP), "mid"] if cuda else ["cpu"])
    p.add_argument("--data", nargs="+", default=["random", "trained-like"])
    p.add_argument("--methods", nargs="+", default=["irdro", "midranking"])
    p.add_argument(
        "--heads", nargs="+", choices=HEADS_GRAD, default=["trainable"], help="frozen: the weight needs no gradient"
    )
    p.add_argument("--accuracy-shapes", nargs="*", default=["mid"] if cuda else ["cpu"])
    p.add_argument("--iters", type=int, default=20 if cuda else 5)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--tag", default=None, help="file name stem (default: <device>-<date>)")
    p.add_argument("--budget-s", type=float, default=None, help="start no case after this many seconds")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    from .report import write_report

    args = parse_args(argv)
    result = run(args)
    stem = args.tag or f"{'gpu' if args.device == 'cuda' else 'cpu'}-{result['date'][:10]}"
    write_report(result, Path(args.out), stem)
    return result


if __name__ == "__main__":
    main()
