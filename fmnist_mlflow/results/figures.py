"""Matplotlib figures: one run's loss curves, a sweep's curves per loss function, accuracy per config,
and a test evaluation's confusion matrix and misclassified examples.

Functions return `Figure`s, made without pyplot: no backend is chosen and no global figure list kept, so
they render on machines without a display and importing this module changes nothing in the process. The
caller saves or logs them; `close` releases the ones pyplot made (Optuna's).
"""

from __future__ import annotations

import sys

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from ..training.config import LOSS_NAMES
from ..training.data import CLASS_NAMES

MISCLASSIFIED_SIDE = 6  # a 6 x 6 grid of the most confidently wrong test images


def run_curves(history: list, title: str) -> Figure:
    """Training and validation loss per epoch (left) and validation accuracy (right) of one run."""
    epochs = [m["epoch"] for m in history]
    fig = Figure(figsize=(10, 4))
    ax_loss, ax_acc = fig.subplots(1, 2)
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
    """The report's loss graph, done per loss function: {(model, loss, optimizer): {seed: history}}.

    CE and BCE live on different scales, so each gets its own panel; solid lines are the seed mean of
    the training loss, dashed lines of the validation loss, one colour per model x optimizer; the band
    spans the lowest to the highest seed (no band with one seed).
    """
    losses = [name for name in LOSS_NAMES if any(key[1] == name for key in histories)]
    fig = Figure(figsize=(7 * len(losses), 5))
    axes = fig.subplots(1, len(losses), squeeze=False)
    colours = matplotlib.colormaps["tab10"]
    n_seeds = max(len(by_seed) for by_seed in histories.values())
    for ax, loss in zip(axes[0], losses):
        keys = sorted(key for key in histories if key[1] == loss)
        for i, key in enumerate(keys):
            runs = list(histories[key].values())
            epochs = min(len(h) for h in runs)  # seeds that ran the same number of epochs
            x = np.arange(1, epochs + 1)
            for metric, style in (("train_loss", "o-"), ("val_loss", "s--")):
                values = np.array([[m[metric] for m in h[:epochs]] for h in runs])
                label = f"{key[0]} {key[2]}" if metric == "train_loss" else None
                ax.plot(x, values.mean(axis=0), style, ms=3, color=colours(i % 10), label=label)
                if len(runs) > 1:
                    ax.fill_between(x, values.min(axis=0), values.max(axis=0), color=colours(i % 10), alpha=0.15)
        seeds = f"mean of {n_seeds} seeds, band: min-max" if n_seeds > 1 else "1 seed"
        ax.set(xlabel="epoch", ylabel="loss (per-example mean)",
               title=f"{LOSS_NAMES[loss]} (solid: train, dashed: val; {seeds})")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def accuracy_bars(configs: list) -> Figure:
    """Validation accuracy per config (seeds.ConfigRow) on a 0-100% axis: the seed mean, each label saying
    over how many seeds, and the 95% interval only for configs that got every seed (a raced-out config's
    few seeds are drawn hatched, without one, as the legend says)."""
    configs = sorted(configs, key=lambda c: c.val_accuracy.mean)
    fig = Figure(figsize=(8, 0.35 * len(configs) + 1.5))
    ax = fig.subplots()
    means = [100 * c.val_accuracy.mean for c in configs]
    most = max(len(c.seeds) for c in configs)
    raced = [bool(getattr(c, "raced_out", "")) or len(c.seeds) < most for c in configs]  # fewer seeds: no interval
    errors = np.array([[100 * (c.val_accuracy.mean - c.val_accuracy.ci95[0]), 100 * (c.val_accuracy.ci95[1] - c.val_accuracy.mean)]
                       if c.val_accuracy.ci95 and not r else [0.0, 0.0] for c, r in zip(configs, raced)]).T
    labels = [f"{c.name} ({len(c.seeds)} seed{'s' if len(c.seeds) != 1 else ''})" for c in configs]
    ax.barh(labels, means, color=["lightgray" if r else "tab:blue" for r in raced], hatch=["//" if r else "" for r in raced])
    with_interval = [i for i in range(len(configs)) if errors[:, i].any()]
    if with_interval:  # only these: a zero-width error bar would still draw its caps
        ax.errorbar([means[i] for i in with_interval], with_interval, xerr=errors[:, with_interval], fmt="none",
                    ecolor="black", capsize=2)
    for i, (mean, r, c) in enumerate(zip(means, raced, configs)):  # the value inside its bar's end
        note = " raced out" if getattr(c, "raced_out", "") else " fewer seeds" if r else ""
        ax.text(mean - 1, i, f"{mean:.2f}{note}", va="center", ha="right", fontsize=7, color="black" if r else "white")
    ax.set_xlim(0, 100)  # bar lengths compare as the accuracies do
    bottom = 0.0
    if any(raced):
        from matplotlib.patches import Patch

        fig.legend(handles=[Patch(color="tab:blue", label="every seed: mean, 95% interval"),
                            Patch(facecolor="lightgray", hatch="//", label="raced out (or a seed failed): mean of its fewer seeds, no interval")],
                   loc="lower center", ncol=2, fontsize=7)
        bottom = 0.3 / fig.get_figheight()  # room for the legend under the axis
    ax.set(xlabel="validation accuracy (%)",
           title="validation accuracy per config: seed mean (seeds in each label)" if most > 1
           else "validation accuracy per config (1 seed)")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout(rect=(0, bottom, 1, 1))
    return fig


def confusion(matrix: np.ndarray, title: str) -> Figure:
    """A confusion matrix with counts: rows are true classes, columns predicted ones."""
    fig = Figure(figsize=(8, 7))
    ax = fig.subplots()
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


def per_class(accuracy: dict, title: str) -> Figure:
    """Test accuracy per class as horizontal bars on one 0-100% axis, worst class easy to spot."""
    names = list(accuracy)
    values = [100 * accuracy[n] for n in names]
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    bars = ax.barh(names, values, color="tab:blue")
    ax.bar_label(bars, labels=[f"{v:.1f}%" for v in values], padding=3, fontsize=8)
    ax.invert_yaxis()  # class 0 on top, as in class_names
    ax.set(xlim=(0, 105), xlabel="test accuracy (%)", title=title)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def misclassified(test, result: dict, title: str) -> Figure:
    """The most confidently wrong test images, with true and predicted class."""
    pred, probs = result["predictions"], result["probabilities"]
    wrong = np.flatnonzero(pred != test.y.numpy())
    wrong = wrong[np.argsort(-probs[wrong, pred[wrong]])][: MISCLASSIFIED_SIDE**2]
    fig = Figure(figsize=(10, 11))
    axes = fig.subplots(MISCLASSIFIED_SIDE, MISCLASSIFIED_SIDE)
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
    """Release a figure pyplot made (Optuna's plots); the ones made here need nothing."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        pyplot.close(fig)
