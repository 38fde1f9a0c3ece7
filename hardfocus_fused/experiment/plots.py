"""Pictures of a run (``hardfocus-train``) and of a comparison (``hardfocus-compare``)."""

from __future__ import annotations

from pathlib import Path

KIND_COLORS = {"common": "tab:blue", "informative": "tab:green", "noise": "tab:red", "data": "tab:gray"}
# Methods get colours no kind of document has, so the two are never confused in one picture.
METHOD_COLORS = {
    "uniform": "black",
    "mean": "dimgray",
    "irdro": "tab:purple",
    "midranking": "tab:orange",
    "highranking": "tab:brown",
    "lowranking": "tab:olive",
}
FONT_SIZE = 11


def method_label(args: dict) -> str:
    """The method with the settings it uses (r for IR-DRO, n1 and n2 for the rankings)."""
    method = args["method"]
    if method == "irdro":
        return f"IR-DRO (r={args['r']:g})"
    if method == "midranking":
        return f"MidRanking (n1={args['n1']:g}, n2={args['n2']:g})"
    if method in ("highranking", "lowranking"):
        return f"{method} (n2={args['n2']:g})"
    return method


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": FONT_SIZE})
    return plt


# Kinds a corpus of one's own names (e.g. the State of the Union's eras), in order of appearance.
_OTHER_KIND_COLORS = ("tab:cyan", "tab:pink", "gold", "teal", "tab:gray")


def kind_colors(kinds) -> dict[str, str]:
    """A colour per kind of document: the built-in corpus's own, then others in turn."""
    others = iter(_OTHER_KIND_COLORS * 4)
    return {kind: KIND_COLORS.get(kind) or next(others) for kind in dict.fromkeys(kinds)}


def weight_vs_loss(ax, steps: list[dict], title: str) -> None:
    """Each sequence's weight against its loss, coloured by the kind of document."""
    for kind, color in kind_colors(k for s in steps for k in s["kinds"]).items():
        points = [(loss, w) for s in steps for loss, w, k in zip(s["seq_loss"], s["weights"], s["kinds"]) if k == kind]
        if points:
            ax.scatter(*zip(*points), s=6, alpha=0.5, color=color, label=kind)
    if steps:
        ax.axhline(1 / len(steps[0]["weights"]), color="gray", linestyle="--", linewidth=1, label="uniform")
    ax.set_xlabel("sequence loss (nats/token)")
    ax.set_ylabel("weight in its batch")
    ax.set_title(title)
    ax.legend()


def heldout_bars(ax, before: dict[str, float], after: dict[str, float]) -> None:
    """Each held-out set's loss before and after, side by side, with the values written on."""
    names = [name for name in before if name in after]
    xs = range(len(names))
    for offset, (label, values, color) in enumerate((("before", before, "lightgray"), ("after", after, "tab:purple"))):
        bars = ax.bar(
            [x + (offset - 0.5) * 0.4 for x in xs],
            [values[n] for n in names],
            0.4,
            label=label,
            color=color,
            edgecolor="black",
            linewidth=0.5,
        )
        ax.bar_label(bars, fmt="%.3f", fontsize=FONT_SIZE - 2, padding=2)
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("held-out loss (nats / token)")
    ax.set_title("held-out loss before and after")
    ax.margins(y=0.15)
    ax.legend()


def plot_run(log: dict, path: Path) -> None:
    """Four panels: the loss per step; the held-out losses before and after, with their
    values; each sequence's weight against its loss; the share of each batch's weight on
    each kind of document."""
    plt = _pyplot()
    steps = log["steps"]
    fig, ((curve, heldout), (scatter, shares)) = plt.subplots(2, 2, figsize=(13, 9.5))
    x = [s["step"] for s in steps]
    curve.plot(x, [s["loss"] for s in steps], label="weighted loss (trained on)", color="tab:purple")
    curve.plot(
        x, [s.get("seq_loss_mean", float("nan")) for s in steps], label="mean sequence loss", alpha=0.7, color="black"
    )
    curve.set_xlabel("batch")
    curve.set_ylabel("nats / token")
    curve.set_title("training loss per batch")
    curve.legend()
    heldout_bars(heldout, log.get("heldout_before", {}), log.get("heldout_after", {}))
    weight_vs_loss(scatter, steps, "where the weight went")
    for kind, color in kind_colors(k for s in steps for k in s["kinds"]).items():
        shares.plot(x, [s["weight_share"].get(kind, 0.0) for s in steps], color=color, label=kind)
    shares.set_xlabel("batch")
    shares.set_ylabel("share of the batch's weight")
    shares.set_title("weight share per kind of document")
    shares.legend()
    fig.suptitle(f"hardfocus-train: {method_label(log['args'])}, {len(steps)} batches", fontsize=FONT_SIZE + 2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
