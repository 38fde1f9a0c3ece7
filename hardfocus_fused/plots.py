"""The training run's picture: loss curve and the distribution of sequence weights."""

from __future__ import annotations

from pathlib import Path


def plot_run(log: dict, path: Path) -> None:
    """Write a PNG with the per-step losses (left) and a histogram of all weights (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = log["steps"]
    fig, (curve, hist) = plt.subplots(1, 2, figsize=(11, 4))
    x = [s["step"] for s in steps]
    curve.plot(x, [s["loss"] for s in steps], label="weighted loss (trained on)")
    curve.plot(x, [s.get("seq_loss_mean", float("nan")) for s in steps], label="mean sequence loss", alpha=0.7)
    for key, style in (("heldout_before", ":"), ("heldout_after", "--")):
        if key in log:
            curve.axhline(log[key], linestyle=style, color="gray", label=key.replace("_", " "))
    curve.set_xlabel("batch")
    curve.set_ylabel("nats / token")
    curve.legend()
    weights = [w for s in steps for w in s["weights"]]
    batch = max(len(s["weights"]) for s in steps) if steps else 1
    hist.hist(weights, bins=40)
    hist.axvline(1 / batch, color="gray", linestyle="--", label=f"uniform 1/{batch}")
    hist.set_xlabel("sequence weight")
    hist.set_ylabel("count (all batches)")
    hist.legend()
    fig.suptitle(f"hardfocus-train: method={log['args']['method']}, r={log['args']['r']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
