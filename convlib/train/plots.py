"""PNG plots of training curves (matplotlib is imported only here, lazily, with the Agg backend)."""

import os

from convlib.train.atomic_files import atomic_path


def plot_history(records: list[dict], path: str | os.PathLike) -> None:
    """Writes a PNG with loss, accuracy and learning rate against the step.

    records: the metrics log of ``convlib.train.fit``: ``{"kind": "step", "step", "loss", "accuracy",
    "learning_rate", ...}`` and ``{"kind": "epoch", "step", "train_loss", "train_accuracy", "test_loss"?,
    "test_accuracy"?, ...}``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = [("loss", "loss", axes[0]), ("accuracy", "accuracy", axes[1])]
    for metric, label, ax in panels:
        ax.plot(
            [r["step"] for r in steps], [r[metric] for r in steps], lw=0.5, alpha=0.4, label=f"train {label} (step)"
        )
        for split in ("train", "test"):
            points = [(r["step"], r[f"{split}_{metric}"]) for r in epochs if f"{split}_{metric}" in r]
            if points:
                ax.plot(*zip(*points), marker="o", label=f"{split} {label} (epoch)")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.legend()
    axes[0].set_yscale("log")
    axes[2].plot([r["step"] for r in steps], [r["learning_rate"] for r in steps])
    axes[2].set_xlabel("step")
    axes[2].set_ylabel("learning rate")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
