"""Training-curve and confusion-matrix PNGs (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history: list[dict[str, Any]], path: str | Path) -> Path:
    """Loss (train/val) and accuracy or R^2 (train/val/EMA val) per epoch."""
    plt = _plt()
    ep = [h["epoch"] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot(ep, [h.get("train_loss") for h in history], label="train")
    if any("val_loss" in h for h in history):
        a1.plot([h["epoch"] for h in history if "val_loss" in h], [h["val_loss"] for h in history if "val_loss" in h],
                label="val")
    a1.set_xlabel("epoch")
    a1.set_ylabel("loss")
    a1.legend()
    key = "accuracy" if any("val_accuracy" in h for h in history) else "r2"
    for name, label in ((f"train_{key}", "train"), (f"val_{key}", "val"), (f"val_ema_{key}", "val (EMA)")):
        pts = [(h["epoch"], h[name]) for h in history if h.get(name) is not None]
        if pts:
            a2.plot(*zip(*pts), label=label)
    a2.set_xlabel("epoch")
    a2.set_ylabel(key)
    a2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_confusion(cm, labels: list[str] | None, path: str | Path, title: str = "confusion matrix") -> Path:
    import numpy as np

    plt = _plt()
    cm = np.asarray(cm)
    n = cm.shape[0]
    labels = labels or [str(i) for i in range(n)]
    size = min(20, max(4, 0.45 * n + 2))
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    if n <= 30:
        ax.set_xticks(range(n), labels, rotation=90 if n > 10 else 0)
        ax.set_yticks(range(n), labels)
        thresh = cm.max() / 2 if cm.size else 0
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=8,
                            color="white" if cm[i, j] > thresh else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
