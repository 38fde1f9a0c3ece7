"""Markdown table and PNG plots of a ``benchmarks.compare`` result."""

from __future__ import annotations

import json
from pathlib import Path


def table(header: list[str], rows: list[list]) -> list[str]:
    """Lines of a markdown table: the header, its rule and one line per row of cells."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(str(cell) for cell in row) + " |" for row in rows
    ]


def markdown(result: dict) -> str:
    lines = [
        f"{result['device']}, torch {result['torch']}, triton {result['triton']}, {result['date']}, "
        f"{result['dtype']}; dense matmul {result['matmul_tflops']:.3g} TFLOP/s; median of {result['iters']}; "
        f"memory: {result['memory']}",
        "",
    ]
    has_err = any("err_loss" in r for r in result["rows"])
    head = "| shape | data | method | pass | impl | ms | peak extra MiB | TFLOP/s |"
    lines += [
        head + (" err loss | err grad_hidden | err grad_weight |" if has_err else ""),
        "|---|---|---|---|---|---:|---:|---:|" + ("---:|---:|---:|" if has_err else ""),
    ]
    for r in result["rows"]:
        method = r["method"] + (" (frozen head)" if r.get("head") == "frozen" else "")
        line = (
            f"| {r['shape']} | {r['data']} | {method} | {r['pass']} | {r['impl']} | {r['ms']:.2f} | "
            f"{'' if r['peak_mb'] is None else format(r['peak_mb'], '.1f')} | {r['tflops']:.2f} |"
        )
        if has_err:
            line += "".join(
                f" {r[k]:.1e} |" if k in r else " |" for k in ("err_loss", "err_grad_hidden", "err_grad_weight")
            )
        lines.append(line)
    lines += [""] + [f"- {note}" for note in result["notes"]]
    return "\n".join(lines) + "\n"


def plot_sweep(result: dict, path: Path) -> bool:
    """Time and memory vs tokens for the ``sweep-N*`` shapes (fwd+bwd, irdro); False if none."""
    rows = [
        r
        for r in result["rows"]
        if r["shape"].startswith("sweep-N")
        and r["pass"] == "fwd+bwd"
        and r["method"] == "irdro"
        and r.get("head", "trainable") == "trainable"
    ]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (t_ax, m_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for impl in dict.fromkeys(r["impl"] for r in rows):
        mine = sorted((int(r["shape"][7:]), r) for r in rows if r["impl"] == impl and r["data"] == "trained-like")
        if mine:
            t_ax.plot([n for n, _ in mine], [r["ms"] for _, r in mine], marker="o", label=impl)
            m_ax.plot([n for n, _ in mine], [r["peak_mb"] for _, r in mine], marker="o", label=impl)
    for ax, label in ((t_ax, "ms (fwd+bwd, median)"), (m_ax, "peak extra MiB")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens (Llama-3-8B head)")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(f"IR-DRO loss, {result['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_report(result: dict, out: Path, stem: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown(result))
    plot_sweep(result, out / f"{stem}-sweep.png")
    print(markdown(result))
