"""PNG figures of a run: confusion matrix and training curves (matplotlib, Agg backend, no display)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay  # noqa: E402


def plot_confusion_matrix(matrix: list[list[int]], label_names: list[str], path: Path, *, title: str) -> None:
    """Counts of (true, predicted) labels, rows = true label."""
    size = 1.5 + 0.7 * len(label_names)
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay(confusion_matrix=np.asarray(matrix), display_labels=label_names).plot(
        ax=ax, cmap="Blues", colorbar=False, xticks_rotation=45
    )
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_training_curves(history: list[dict[str, Any]], best_epoch: int, path: Path) -> None:
    """Training loss terms (left) and dev weighted F1 / accuracy (right) per epoch."""
    epochs = [h["epoch"] for h in history]
    fig, (loss_ax, dev_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for term in history[0]["train"]:
        loss_ax.plot(epochs, [h["train"][term] for h in history], label=term)
    loss_ax.set(xlabel="epoch", ylabel="training loss", title="Training loss terms")
    loss_ax.legend()
    for metric in ("weighted_f1", "accuracy"):
        dev_ax.plot(epochs, [h["dev"][metric] for h in history], marker=".", label=f"dev {metric}")
    dev_ax.axvline(best_epoch, color="grey", linestyle="--", label=f"best epoch {best_epoch}")
    dev_ax.set(xlabel="epoch", ylabel="score", title="Dev set", ylim=(0, 1))
    dev_ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
