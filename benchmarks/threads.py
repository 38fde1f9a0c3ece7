"""How many CPU threads the built-in main job should use: ``hardfocus-train`` with 1 and
with 2 PyTorch threads, on an idle machine and with busy processes beside it.

    python -m benchmarks.threads --out benchmarks/results/threads-builtin-cpu-DATE.md

Each setting runs ``hardfocus-train --num-batches N --quiet`` from the cached built-in base
(trained first if missing) in a fresh process and records its wall and user time.  The
load is ``--load`` processes spinning in Python (bounded by the run's own length), which
is what a newcomer's machine running anything else looks like to OpenMP's barriers.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _spin(stop_at: float) -> None:
    while time.time() < stop_at:
        pass


def run_once(threads: int, batches: int, load: int, limit_s: float = 900) -> tuple[float, float]:
    """``(wall, user)`` seconds of one ``hardfocus-train`` run with ``threads`` threads."""
    spinners = [multiprocessing.Process(target=_spin, args=(time.time() + limit_s,)) for _ in range(load)]
    for p in spinners:
        p.start()
    try:
        with tempfile.TemporaryDirectory() as out:
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "hardfocus_fused.experiment.train",
                    "--num-batches",
                    str(batches),
                    "--quiet",
                    "--threads",
                    str(threads),
                    "--output-dir",
                    out,
                ],
                check=True,
                timeout=limit_s,
                env={**os.environ, "OMP_NUM_THREADS": str(threads)},
            )
            wall = time.perf_counter() - start
            user = resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime - before.ru_utime
    finally:
        for p in spinners:
            p.terminate()
            p.join()
    return wall, user


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, default=20, help="training batches per run")
    p.add_argument("--load", type=int, default=4, help="busy processes beside the loaded runs")
    p.add_argument("--repeats", type=int, default=2, help="runs per setting (the table shows each)")
    p.add_argument("--out", type=Path, required=True, help="the markdown result file")
    args = p.parse_args(argv)
    from hardfocus_fused.experiment.base import ensure_base

    ensure_base(say=print)
    rows = []
    for load in (0, args.load):
        for threads in (1, 2):
            for _ in range(args.repeats):
                wall, user = run_once(threads, args.batches, load)
                rows.append((load, threads, wall, user))
                print(f"load {load}, {threads} thread(s): {wall:.1f} s wall, {user:.1f} s user", flush=True)
    lines = [
        f"# hardfocus-train thread count, {datetime.date.today().isoformat()}",
        "",
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"Python {platform.python_version()}. `hardfocus-train --num-batches {args.batches} --quiet` from the "
        f"cached built-in base, each run a fresh process (model loading and held-out evaluation included); "
        f"'loaded' = {args.load} busy Python processes beside it. Produced by `python -m benchmarks.threads`.",
        "",
        "| machine | threads | wall (s) | user CPU (s) |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| {'loaded' if load else 'idle'} | {threads} | {wall:.1f} | {user:.1f} |"
        for load, threads, wall, user in rows
    ]
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
