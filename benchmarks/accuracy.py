"""Accuracy alone: ``err_*`` of each implementation against fp64 eager PyTorch.

``python -m benchmarks.accuracy`` writes ``<out>/<tag>.json`` and ``.md`` with the device,
versions and date.  It is ``benchmarks.compare``'s accuracy measurement without the
timing, for a quick re-check after a numerics change.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch

from .compare import accuracy, device_name
from .peers import IMPLS, unavailable
from .shapes import SHAPES, make_inputs


def main(argv=None) -> dict:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--dtype", default="bfloat16" if cuda else "float32")
    p.add_argument(
        "--impls",
        nargs="+",
        default=list(IMPLS) if cuda else ["eager", "torch_native", "hardfocus"],
        help="those that cannot run here are noted and skipped",
    )
    p.add_argument("--shapes", nargs="+", default=["mid"] if cuda else ["cpu"])
    p.add_argument("--data", nargs="+", default=["random", "trained-like"])
    p.add_argument("--methods", nargs="+", default=["irdro", "midranking"])
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--tag", default=None)
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    result = {
        "device": device_name(args.device),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "dtype": args.dtype,
        "rows": [],
        "notes": [],
    }
    lines = [
        "| shape | data | method | impl | err loss | err grad_hidden | err grad_weight |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for impl in args.impls:
        why = unavailable(impl, args.device)
        if why:
            result["notes"].append(f"skipped {impl}: {why}")
            continue
        for shape in args.shapes:
            for data in args.data:
                hidden, weight, labels = make_inputs(SHAPES[shape], data, dtype, args.device)
                for method in args.methods:
                    row = {
                        "impl": impl,
                        "method": method,
                        "shape": shape,
                        "data": data,
                        **accuracy(impl, hidden, weight, labels, method),
                    }
                    result["rows"].append(row)
                    lines.append(
                        f"| {shape} | {data} | {method} | {impl} | {row['err_loss']:.1e} | "
                        f"{row['err_grad_hidden']:.1e} | {row['err_grad_weight']:.1e} |"
                    )
                    print(lines[-1], flush=True)
    stem = args.tag or f"accuracy-{'gpu' if args.device == 'cuda' else 'cpu'}-{result['date'][:10]}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    header = (
        f"{result['device']}, torch {result['torch']}, {result['date']}, {result['dtype']}; "
        f"error = max abs error / max abs of the fp64 eager reference"
    )
    (out / f"{stem}.md").write_text("\n".join([header, "", *lines, "", *(f"- {n}" for n in result["notes"])]) + "\n")
    return result


if __name__ == "__main__":
    main()
