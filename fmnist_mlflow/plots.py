"""Matplotlib figures: one run's loss curves, a sweep's curves per loss function, accuracy per config,
and a test evaluation's confusion matrix and misclassified examples.

Functions return `Figure`s; the caller saves or logs them (and closes them). The Agg backend is forced so
that figures render on machines without a display.
"""

from __future__ import annotations

import matplotlib
import numpy as np

matplotlib.use("Agg")

from matplotlib import pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from .data import CLASS_NAMES  # noqa: E402

LOSS_TITLES = {"ce": "CrossEntropyLoss", "bce": "BCEWithLogitsLoss"}
MISCLASSIFIED_SIDE = 6  # a 6 x 6 grid of the most confidently wrong test images


def run_curves(history: list, title: str) -> Figure:
    """Training and validation loss per epoch (left) and validation accuracy (right) of one run."""
    epochs = [m["epoch"] for m in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [m["train_loss"] for m in history], "o-", label="train loss")
    ax_loss.plot(epochs, [m["val_loss"] for m in history], "s--", label="validation loss")
    ax_loss.set(xlabel="epoch", ylabel="loss (per-example mean)", title=title)
    ax_loss.legend()
    ax_acc.plot(epochs, [100 * m["val_accuracy"] for m in history], "o-", color="tab:green")
    ax_acc.set(xlabel="epoch", ylabel="validation accuracy (%)", title="validation accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def sweep_curves(histories: dict) -> Figure:
    """The report's loss graph, done per loss function: {(model, loss, optimizer): history}.

    CE and BCE live on different scales, so each gets its own panel; solid lines are training loss,
    dashed lines validation loss, one colour per model x optimizer.
    """
    losses = [name for name in LOSS_TITLES if any(key[1] == name for key in histories)]
    fig, axes = plt.subplots(1, len(losses), figsize=(7 * len(losses), 5), squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, loss in zip(axes[0], losses):
        keys = sorted(key for key in histories if key[1] == loss)
        for i, key in enumerate(keys):
            history = histories[key]
            epochs = [m["epoch"] for m in history]
            label = f"{key[0]} {key[2]}"
            ax.plot(epochs, [m["train_loss"] for m in history], "o-", ms=3, color=colours(i % 10), label=label)
            ax.plot(epochs, [m["val_loss"] for m in history], "s--", ms=3, color=colours(i % 10))
        ax.set(xlabel="epoch", ylabel="loss (per-example mean)", title=f"{LOSS_TITLES[loss]} (solid: train, dashed: val)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def accuracy_bars(rows: list) -> Figure:
    """Final validation accuracy per config; rows are dicts with `name` and `val_accuracy`."""
    rows = sorted(rows, key=lambda r: r["val_accuracy"])
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.5))
    ax.barh([r["name"] for r in rows], [100 * r["val_accuracy"] for r in rows], color="tab:blue")
    for i, row in enumerate(rows):
        ax.text(100 * row["val_accuracy"], i, f" {100 * row['val_accuracy']:.2f}", va="center", fontsize=8)
    low = min(100 * r["val_accuracy"] for r in rows)
    ax.set_xlim(max(0, low - 5), 100)
    ax.set(xlabel="validation accuracy (%)", title="final validation accuracy per config")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return fig


def confusion(matrix: np.ndarray, title: str) -> Figure:
    """A confusion matrix with counts: rows are true classes, columns predicted ones."""
    fig, ax = plt.subplots(figsize=(8, 7))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(CLASS_NAMES)), CLASS_NAMES, rotation=45, ha="right")
    ax.set_yticks(range(len(CLASS_NAMES)), CLASS_NAMES)
    threshold = matrix.max() / 2
    for i in range(len(CLASS_NAMES)):
        for j in range(len(CLASS_NAMES)):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if matrix[i, j] > threshold else "black")
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    return fig


def misclassified(test, result: dict, title: str) -> Figure:
    """The most confidently wrong test images, with true and predicted class."""
    pred, probs = result["predictions"], result["probabilities"]
    wrong = np.flatnonzero(pred != test.y.numpy())
    wrong = wrong[np.argsort(-probs[wrong, pred[wrong]])][: MISCLASSIFIED_SIDE**2]
    fig, axes = plt.subplots(MISCLASSIFIED_SIDE, MISCLASSIFIED_SIDE, figsize=(10, 11))
    for ax in axes.flat:
        ax.axis("off")
    for ax, index in zip(axes.flat, wrong):
        ax.imshow(test.x[index, 0].numpy(), cmap="gray")
        ax.set_title(f"{CLASS_NAMES[test.y[index]]}\n-> {CLASS_NAMES[pred[index]]} {probs[index, pred[index]]:.0%}",
                     fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def close(fig: Figure) -> None:
    plt.close(fig)
