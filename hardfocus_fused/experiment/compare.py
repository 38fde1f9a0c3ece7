"""``hardfocus-compare``: the paper's experiment, several methods side by side.

Every method continues the same base model over the same data orders (``--seeds``), and
the held-out losses on each kind of document are compared with the base's:

    hardfocus-compare --methods uniform,midranking,irdro --seeds 3

writes ``compare.md`` (mean and spread over the seeds per method and held-out set, and
where the weight went), ``compare.json`` and ``compare.png`` to ``--output-dir``.  Any
other ``hardfocus-train`` option (``--num-batches``, ``--lr``, ``--r``, ``--model``,
``--dataset``, ...) applies to every run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from ..weighting.methods import METHODS
from .train import BUILTIN, UserError, build_parser, check_extra, parse_args, threads_for, train

# Options hardfocus-compare sets itself for each run.
_SET_PER_RUN = ("--method", "--seed", "--output-dir", "--resume", "--quiet")


def _passed_through() -> str:
    """The ``hardfocus-train`` options that apply to every run, for ``--help``."""
    options = [
        action.option_strings[-1]
        for action in build_parser()._actions
        if action.option_strings and action.option_strings[-1] not in (*_SET_PER_RUN, "--help", "--overwrite")
    ]
    return (
        "Every other hardfocus-train option applies to every run (see hardfocus-train --help): "
        + " ".join(options)
        + "."
    )


def parse(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        prog="hardfocus-compare",
        description=__doc__.split("\n\n")[0],
        epilog=_passed_through(),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--methods", default="uniform,midranking,irdro", help="comma-separated, of " + ", ".join(METHODS))
    p.add_argument("--seeds", type=int, default=3, help="data orders per method")
    p.add_argument(
        "--output-dir", default="hardfocus-compare", help="where compare.md, compare.json and compare.png are written"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a comparison already in --output-dir")
    args, train_argv = p.parse_known_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or not args.methods:
        raise UserError(f"--methods: unknown {unknown or 'none given'}; choose from {', '.join(METHODS)}")
    if args.seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {args.seeds}")
    for banned in _SET_PER_RUN[:-1]:
        if any(a == banned or a.startswith(banned + "=") for a in train_argv):
            raise UserError(f"{banned} is set by hardfocus-compare for each run")
    return args, train_argv


def run_all(args: argparse.Namespace, train_argv: list[str], say=print) -> dict:
    """Train every (method, seed) without saving models; the result dict of ``compare.json``.
    ``say`` gets one line as each run starts and one with its held-out losses as it ends."""
    runs = []
    total = args.seeds * len(args.methods)
    for seed in range(args.seeds):
        for method in args.methods:
            run_args = parse_args(
                [
                    *train_argv,
                    "--method",
                    method,
                    "--seed",
                    str(seed),
                    "--quiet",
                    "--output-dir",
                    str(Path(args.output_dir) / f"{method}-seed{seed}"),
                ]
            )
            if not runs and run_args.model == BUILTIN:
                from .base import ensure_base

                ensure_base(say=say)  # says so when the base is trained (once)
            say(f"[{len(runs) + 1}/{total}] {method}, seed {seed}: training {run_args.num_batches} batches ...")
            start = time.time()
            log = train(run_args, save=False)
            say(
                f"[{len(runs) + 1}/{total}] {method}, seed {seed}: held-out after "
                + ", ".join(f"{k} {v:.4f}" for k, v in log["heldout_after"].items())
                + f" ({time.time() - start:.0f} s)"
            )
            runs.append(
                {
                    "method": method,
                    "seed": seed,
                    "heldout_before": log["heldout_before"],
                    "heldout_after": log["heldout_after"],
                    "steps": log["steps"],
                }
            )
    settings = {k: v for k, v in vars(run_args).items() if k not in ("method", "seed", "output_dir", "given")}
    return {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "methods": args.methods,
        "seeds": args.seeds,
        "settings": settings,
        "runs": runs,
        "summary": summarize(runs, args.methods),
    }


def summarize(runs: list[dict], methods: list[str]) -> dict:
    """Per method: mean and standard deviation over the seeds of each held-out loss after
    training and of its change from before; the mean share of the weight on each kind."""
    out = {}
    for method in methods:
        mine = [r for r in runs if r["method"] == method]
        sets = list(mine[0]["heldout_after"])
        after = {s: [r["heldout_after"][s] for r in mine] for s in sets}
        delta = {s: [r["heldout_after"][s] - r["heldout_before"][s] for r in mine] for s in sets}
        steps = [step for r in mine for step in r["steps"]]
        kinds = list(dict.fromkeys(kind for step in steps for kind in step["kinds"]))
        shares = {k: [step["weight_share"].get(k, 0.0) for step in steps] for k in kinds}
        documents = {k: [step["kinds"].count(k) / len(step["kinds"]) for step in steps] for k in kinds}
        out[method] = {
            "after": {s: _mean_sd(v) for s, v in after.items()},
            "delta": {s: _mean_sd(v) for s, v in delta.items()},
            "weight_share": {k: statistics.fmean(v) for k, v in shares.items()},
            "document_share": {k: statistics.fmean(v) for k, v in documents.items()},
            "ess": statistics.fmean(step.get("ess", 0.0) for step in steps),
        }
    return out


def _mean_sd(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}


def markdown(result: dict) -> str:
    s = result["settings"]
    summary = result["summary"]
    sets = list(next(iter(summary.values()))["after"])
    before = result["runs"][0]["heldout_before"]
    lines = [
        f"# hardfocus-compare, {result['date']}",
        "",
        f"{result['device']}, torch {result['torch']}; model `{s['model']}`, dataset `{s['dataset']}`, "
        f"{s['num_batches']} batches of {s['batch_size']}, lr {s['lr']}, r {s['r']}, n1 {s['n1']}, n2 {s['n2']}; "
        + _orders(result["seeds"]),
        "",
        "Held-out loss after training (nats/token; lower is better), change from the base model in brackets:",
        "",
        "| method | " + " | ".join(sets) + " |",
        "|---|" + "---:|" * len(sets),
        "| base model | " + " | ".join(f"{before[x]:.4f}" for x in sets) + " |",
    ]
    spread = result["seeds"] > 1
    for method, row in summary.items():
        cells = [
            f"{row['after'][x]['mean']:.4f}"
            + (f" ± {row['after'][x]['sd']:.4f}" if spread else "")
            + f" ({row['delta'][x]['mean']:+.4f})"
            for x in sets
        ]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    kinds = list(next(iter(summary.values()))["weight_share"])
    lines += [
        "",
        "Where the weight went (mean share of each batch's weight; documents' share in brackets) "
        "and the mean effective sample size:",
        "",
        "| method | " + " | ".join(kinds) + " | ESS |",
        "|---|" + "---:|" * (len(kinds) + 1),
    ]
    for method, row in summary.items():
        cells = [f"{row['weight_share'][k]:.3f} ({row['document_share'][k]:.3f})" for k in kinds]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {row['ess']:.2f} |")
    return "\n".join(lines) + "\n"


def _orders(seeds: int) -> str:
    if seeds == 1:
        return "one data order per method (seed 0; run --seeds 3 or more for a spread)."
    return f"{seeds} data orders per method (mean ± sd over them)."


def plot(result: dict, path: Path) -> None:
    """One picture: the held-out change per method and set, where each method's weight
    went (per kind), and each weighted method's weight against loss per sequence.  Methods
    and kinds of documents have colours of their own (``plots.METHOD_COLORS``,
    ``plots.kind_colors``)."""
    import math

    from .plots import FONT_SIZE, METHOD_COLORS, _pyplot, kind_colors, weight_vs_loss

    plt = _pyplot()
    summary = result["summary"]
    methods = list(summary)
    weighted = [m for m in methods if m not in ("uniform", "mean")]
    panels = 2 + len(weighted)
    ncols = panels if panels <= 2 else (2 if panels <= 4 else 3)
    nrows = math.ceil(panels / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 5.2 * nrows), squeeze=False)
    axes = axes.ravel()
    for ax in axes[panels:]:
        ax.set_visible(False)
    bars, shares = axes[0], axes[1]
    sets = list(summary[methods[0]]["delta"])
    width = 0.8 / len(methods)
    spread = result["seeds"] > 1
    for i, method in enumerate(methods):
        xs = [j + i * width for j in range(len(sets))]
        bars.bar(
            xs,
            [summary[method]["delta"][s]["mean"] for s in sets],
            width,
            yerr=[summary[method]["delta"][s]["sd"] for s in sets] if spread else None,
            label=method,
            capsize=3,
            color=METHOD_COLORS.get(method, f"C{i}"),
        )
    bars.axhline(0, color="black", linewidth=0.8)
    bars.set_xticks([j + 0.4 - width / 2 for j in range(len(sets))], sets)
    bars.set_ylabel("held-out loss after - before (nats/token)")
    bars.set_title(
        "held-out loss change from the base\n(below 0: better" + ("; bars: sd over data orders)" if spread else ")")
    )
    bars.legend()
    colors = kind_colors(summary[methods[0]]["weight_share"])
    bottom = [0.0] * len(methods)
    for kind, color in colors.items():
        values = [summary[m]["weight_share"][kind] for m in methods]
        shares.bar(methods, values, bottom=bottom, color=color, label=kind)
        bottom = [b + v for b, v in zip(bottom, values)]
    shares.set_ylabel("mean share of each batch's weight")
    shares.set_title("where the weight went, per kind of document")
    shares.legend()
    for ax, method in zip(axes[2:], weighted):
        run = next(r for r in result["runs"] if r["method"] == method and r["seed"] == 0)
        weight_vs_loss(ax, run["steps"], f"{method}: weight vs loss per sequence (seed 0)")
    orders = f"{result['seeds']} data orders" if spread else "one data order"
    fig.suptitle(
        f"Continual training from a trained base: {', '.join(methods)} "
        f"({result['settings']['num_batches']} batches, {orders})",
        fontsize=FONT_SIZE + 2,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_compare(argv: list[str] | None = None, say=print) -> dict:
    """Run the comparison of ``argv`` and write its files; the result of ``compare.json``.
    Raises :class:`UserError` for a mistake in the options, before any slow work."""
    check_extra()
    args, train_argv = parse(argv)
    out = Path(args.output_dir)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UserError(f"--output-dir {out} already holds a comparison; pass --overwrite to replace it")
    shared = parse_args([*train_argv, "--quiet"])  # the shared options are checked before any run
    with threads_for(shared):
        result = run_all(args, train_argv, say=say)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(result, indent=1))
    (out / "compare.md").write_text(markdown(result))
    plot(result, out / "compare.png")
    say(markdown(result))
    say(f"wrote {out / 'compare.md'}, {out / 'compare.json'} and {out / 'compare.png'}")
    return result


def main(argv: list[str] | None = None) -> int:
    """The ``hardfocus-compare`` command: exit status 0 after a comparison, 2 (with a
    one-line message) for a mistake in the options."""
    try:
        run_compare(argv, say=lambda *a: print(*a, flush=True))
    except UserError as error:
        print(f"hardfocus-compare: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
