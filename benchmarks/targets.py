"""The GPU performance targets (issue #7), measured in one run and checked.

``python -m benchmarks.targets`` (on a GPU) measures only the cases the targets need, with
the ``benchmarks.compare`` harness (bf16, trained-like data), and writes
``<out>/targets-gpu-<date>.json`` and ``.md``: the measured rows and a verdict per target.
``--from RESULT.json`` checks an existing ``benchmarks.compare`` result instead; targets
whose rows it lacks are reported as not measured, never as met.

Every target is a ratio of two numbers from the same run, so that clock and thermal
noise largely cancel.  "Fills the GPU" at N=1024 is read as: at least 80% of the TFLOP/s
the same head reaches at N=16384 (the Llama-3-8B head shape).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

DATA = "trained-like"
HEAD_SHAPES = ("gemma2-2b", "llama3-8b")
SMALL_N, LARGE_N = "sweep-N1024", "llama3-8b"   # the Llama-3-8B head at 1024 and 16384 tokens

# (impl, method, shape, data, head) of every case the targets read.
PLAN = (
    *((impl, "irdro", shape, DATA, "trainable") for shape in HEAD_SHAPES for impl in ("hardfocus", "cce",
                                                                                       "torch_compile")),
    *(("hardfocus", "midranking", shape, DATA, "trainable") for shape in HEAD_SHAPES),
    *(("hardfocus", "irdro", shape, DATA, "frozen") for shape in HEAD_SHAPES),
    ("hardfocus", "irdro", SMALL_N, DATA, "trainable"),
)


class Rows:
    """A result's rows, looked up by case and pass (``KeyError`` when not measured)."""

    def __init__(self, result: dict):
        self.matmul_tflops = result.get("matmul_tflops")
        self._rows = {(r["impl"], r["method"], r["shape"], r["data"], r.get("head", "trainable"), r["pass"]): r
                      for r in result["rows"]}

    def get(self, impl: str, shape: str, kind: str, method: str = "irdro", head: str = "trainable") -> dict:
        return self._rows[(impl, method, shape, DATA, head, kind)]

    def ms(self, impl: str, shape: str, kind: str, **case) -> float:
        return self.get(impl, shape, kind, **case)["ms"]


@dataclass(frozen=True)
class Target:
    """``value(rows, shape)`` must be at most (or at least) ``limit`` for every shape."""

    what: str
    limit: float
    at_most: bool
    shapes: tuple[str, ...]
    value: Callable[[Rows, str], float]

    def met(self, value: float) -> bool:
        return value <= self.limit if self.at_most else value >= self.limit


def _peak_ratio(rows: Rows, shape: str) -> float:
    ours, theirs = (rows.get(impl, shape, "fwd+bwd")["peak_mb"] for impl in ("hardfocus", "cce"))
    if ours is None or theirs is None:
        raise KeyError("peak memory is measured on a GPU only")
    return ours / theirs


def _forward_share(rows: Rows, shape: str) -> float:
    if not rows.matmul_tflops:
        raise KeyError("matmul_tflops")
    return rows.get("hardfocus", shape, "fwd")["tflops"] / rows.matmul_tflops


def _fill(kind: str) -> Callable[[Rows, str], float]:
    return lambda rows, shape: rows.get("hardfocus", shape, kind)["tflops"] / rows.get("hardfocus", LARGE_N,
                                                                                        kind)["tflops"]


TARGETS = (
    Target("IR-DRO fwd+bwd time / Cut Cross-Entropy's", 0.8, True, HEAD_SHAPES,
           lambda rows, s: rows.ms("hardfocus", s, "fwd+bwd") / rows.ms("cce", s, "fwd+bwd")),
    Target("IR-DRO fwd+bwd time / torch.compile's", 0.6, True, HEAD_SHAPES,
           lambda rows, s: rows.ms("hardfocus", s, "fwd+bwd") / rows.ms("torch_compile", s, "fwd+bwd")),
    Target("IR-DRO fwd+bwd peak extra memory / Cut Cross-Entropy's", 1.0, True, HEAD_SHAPES, _peak_ratio),
    Target("forward TFLOP/s / dense matmul TFLOP/s", 0.6, False, HEAD_SHAPES, _forward_share),
    Target("MidRanking bwd time / IR-DRO bwd time", 0.55, True, HEAD_SHAPES,
           lambda rows, s: rows.ms("hardfocus", s, "bwd", method="midranking") / rows.ms("hardfocus", s, "bwd")),
    Target("frozen-head bwd time / trainable-head bwd time", 0.6, True, HEAD_SHAPES,
           lambda rows, s: rows.ms("hardfocus", s, "bwd", head="frozen") / rows.ms("hardfocus", s, "bwd")),
    Target("fwd TFLOP/s at N=1024 / at N=16384", 0.8, False, (SMALL_N,), _fill("fwd")),
    Target("fwd+bwd TFLOP/s at N=1024 / at N=16384", 0.8, False, (SMALL_N,), _fill("fwd+bwd")),
)


def evaluate(result: dict) -> list[dict]:
    """One verdict per (target, shape): ``{"target", "shape", "value", "limit", "verdict"}``
    with ``verdict`` "met", "missed" or "not measured" (``value`` None)."""
    rows = Rows(result)
    verdicts = []
    for target in TARGETS:
        for shape in target.shapes:
            try:
                value = target.value(rows, shape)
            except KeyError:
                value = None
            verdict = "not measured" if value is None else ("met" if target.met(value) else "missed")
            verdicts.append({"target": target.what, "shape": shape, "value": value,
                             "limit": ("<= " if target.at_most else ">= ") + f"{target.limit:g}", "verdict": verdict})
    return verdicts


def verdict_table(verdicts: list[dict]) -> str:
    lines = ["| target | shape | value | limit | verdict |", "|---|---|---:|---:|---|"]
    for v in verdicts:
        value = "" if v["value"] is None else f"{v['value']:.3f}"
        lines.append(f"| {v['target']} | {v['shape']} | {value} | {v['limit']} | {v['verdict']} |")
    return "\n".join(lines) + "\n"


def measure(argv: list[str], shapes=None, on_case=None) -> dict:
    """Run the ``PLAN`` cases (on ``shapes``, default all) through ``benchmarks.compare``
    (its options in ``argv``), calling ``on_case(result)`` after each."""
    from . import compare

    plan = [case for case in PLAN if shapes is None or case[2] in shapes]
    return compare.run(compare.parse_args([*argv, "--accuracy-shapes"]), plan, on_case)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--from", dest="source", default=None, help="check this benchmarks.compare JSON instead")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--shapes", nargs="+", default=None,
                   help=f"measure only the plan's cases on these shapes (of {sorted({c[2] for c in PLAN})})")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--tag", default=None, help="file name stem (default: targets-<device>-<date>)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def stem(result: dict) -> str:
        return args.tag or f"targets-{'cpu' if result['device'].startswith('cpu') else 'gpu'}-{result['date'][:10]}"

    def write_json(result: dict) -> None:   # after every case: a stopped run keeps its rows
        result["targets"] = evaluate(result)
        (out / f"{stem(result)}.json").write_text(json.dumps(result, indent=1) + "\n")

    if args.source:
        result = json.loads(Path(args.source).read_text())
    else:
        result = measure(["--iters", str(args.iters), "--out", args.out], args.shapes, write_json)
        write_json(result)
    result["targets"] = evaluate(result)
    from .report import markdown

    text = verdict_table(result["targets"]) + "\n" + markdown(result)
    (out / f"{stem(result)}.md").write_text(text)
    print(text)
    return result


if __name__ == "__main__":
    main()
