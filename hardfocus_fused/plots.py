"""Pictures of a run (``hardfocus-train``) and of a comparison (``hardfocus-compare``)."""

from __future__ import annotations

from pathlib import Path

KIND_COLORS = {"common": "tab:blue", "informative": "tab:green", "noise": "tab:red", "data": "tab:gray"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def weight_vs_loss(ax, steps: list[dict], title: str) -> None:
    """Each sequence's weight against its loss, coloured by the kind of document."""
    for kind, color in KIND_COLORS.items():
        points = [(loss, w) for s in steps for loss, w, k in zip(s["seq_loss"], s["weights"], s["kinds"]) if k == kind]
        if points:
            ax.scatter(*zip(*points), s=6, alpha=0.5, color=color, label=kind)
    if steps:
        ax.axhline(1 / len(steps[0]["weights"]), color="gray", linestyle="--", linewidth=1, label="uniform")
    ax.set_xlabel("sequence loss (nats/token)")
    ax.set_ylabel("weight in its batch")
    ax.set_title(title)
    ax.legend(fontsize=8)


def plot_run(log: dict, path: Path) -> None:
    """Losses per step, held-out losses before and after; each sequence's weight against
    its loss; the share of each batch's weight on each kind of document."""
    plt = _pyplot()
    steps = log["steps"]
    fig, (curve, scatter, shares) = plt.subplots(1, 3, figsize=(16, 4.5))
    x = [s["step"] for s in steps]
    curve.plot(x, [s["loss"] for s in steps], label="weighted loss (trained on)")
    curve.plot(x, [s.get("seq_loss_mean", float("nan")) for s in steps], label="mean sequence loss", alpha=0.7)
    before, after = log.get("heldout_before", {}), log.get("heldout_after", {})
    for name, value in before.items():
        color = KIND_COLORS.get(name, "black")
        curve.axhline(value, color=color, linestyle=":", linewidth=1)
        if name in after:
            curve.axhline(after[name], color=color, linestyle="--", linewidth=1,
                          label=f"held-out {name}: {value:.3f} -> {after[name]:.3f}")
    curve.set_xlabel("batch")
    curve.set_ylabel("nats / token")
    curve.set_title("loss (held-out: dotted before, dashed after)")
    curve.legend(fontsize=7)
    weight_vs_loss(scatter, steps, "where the weight went")
    kinds = list(dict.fromkeys(k for s in steps for k in s["kinds"]))
    for kind in kinds:
        shares.plot(x, [s["weight_share"].get(kind, 0.0) for s in steps], color=KIND_COLORS.get(kind), label=kind)
    shares.set_xlabel("batch")
    shares.set_ylabel("share of the batch's weight")
    shares.set_title("weight share per kind of document")
    shares.legend(fontsize=8)
    args = log["args"]
    fig.suptitle(f"hardfocus-train: method={args['method']}, r={args['r']}, n1={args['n1']}, n2={args['n2']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
