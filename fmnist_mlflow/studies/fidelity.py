"""What early epochs say about the last one: the measurement a pruner's settings rest on.

From a study's per-epoch validation curves (Optuna's intermediate values, one per epoch): for each epoch
k before the last, the rank correlation (Spearman) of the completed trials' epoch-k value with their final
value, and which of the final top trials were below the median at epoch k (the ones a median rule would
have lost there). Also every trial's curve as CSV (`curves.csv`), and a figure of the curves coloured by
final rank. A learning-rate schedule that peaks mid-run (onecycle) makes early epochs rank trials
differently from the last one, which is why this is measured rather than assumed.
"""

from __future__ import annotations

import csv
import io
import statistics
from dataclasses import dataclass
from typing import Optional

import optuna

from .pruners import TOP, top_trials, whole_curves


@dataclass(frozen=True)
class EarlyEpoch:
    epoch: int
    trials: int
    spearman: Optional[float]  # None below 3 trials or when a side has no spread
    top_below_median: tuple  # final top trials (numbers, best first) below the epoch's median


def early_epochs(study: optuna.Study, epochs: int, top: int = TOP) -> list:
    """One EarlyEpoch per epoch 1..epochs-1, over the completed trials with a whole curve."""
    from scipy.stats import spearmanr

    trials = whole_curves(study, epochs)
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    best = top_trials(trials, maximize, top)
    final = [t.value for t in trials]
    out = []
    for k in range(1, epochs):
        at = [t.intermediate_values[k] for t in trials]
        rho = None
        if len(trials) >= 3 and len(set(at)) > 1 and len(set(final)) > 1:
            rho = float(spearmanr(at, final).statistic)
        median = statistics.median(at) if at else None
        value = {t.number: t.intermediate_values[k] for t in trials}
        below = tuple(n for n in best if (value[n] < median if maximize else value[n] > median))
        out.append(EarlyEpoch(k, len(trials), rho, below))
    return out


def markdown(rows: list, metric: str, top: int = TOP) -> str:
    n = rows[0].trials if rows else 0
    lines = [f"What epoch k says about the final {metric}, over {n} completed trial(s): Spearman's rank correlation "
             f"of the epoch-k value with the final one, and the final top {top} trials (best first) that were below "
             f"the median at epoch k.", "",
             f"| epoch | Spearman (epoch k vs final) | final top {top} below the median at epoch k |", "|---|---|---|"]
    for r in rows:
        rho = "-" if r.spearman is None else f"{r.spearman:.2f}"
        below = ", ".join(f"trial {n}" for n in r.top_below_median) or "none"
        lines.append(f"| {r.epoch} | {rho} | {below} |")
    return "\n".join(lines) + "\n"


def curves_csv(study: optuna.Study) -> str:
    """Every trial's curve, one row per (trial, epoch): the raw data of the table and figure."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["number", "state", "epoch", "value", "final_value"])
    for t in study.get_trials(deepcopy=False):
        for epoch in sorted(t.intermediate_values):
            writer.writerow([t.number, t.state.name, epoch, t.intermediate_values[epoch],
                             "" if t.value is None else t.value])
    return out.getvalue()


def figure(study: optuna.Study, epochs: int, metric: str):
    """Each trial's curve; completed ones coloured by final rank (dark = best, the top 5 bold), pruned ones
    grey and dashed up to the epoch they stopped at. Left: every value; right: the same, zoomed on the
    final top trials' region."""
    import matplotlib
    from matplotlib.figure import Figure

    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    done = sorted(whole_curves(study, epochs), key=lambda t: t.value, reverse=maximize)
    pruned = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.PRUNED,))
    fig = Figure(figsize=(12, 5))
    axes = fig.subplots(1, 2)
    cmap = matplotlib.colormaps["viridis"]
    for ax in axes:
        for t in pruned:  # a marker where each stopped: one pruned after its first epoch is a point, not a line
            steps = sorted(t.intermediate_values)
            ax.plot(steps, [t.intermediate_values[s] for s in steps], color="0.6", ls="--", lw=0.8, marker="x",
                    markevery=[len(steps) - 1] if steps else None, markersize=6)
        for rank, t in enumerate(done):
            steps = sorted(t.intermediate_values)
            ax.plot(steps, [t.intermediate_values[s] for s in steps], color=cmap(rank / max(1, len(done) - 1)),
                    lw=2.0 if rank < TOP else 0.9, label=f"trial {t.number} (final rank {rank + 1})" if rank < TOP else None)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
    top = [t.value for t in done[:2 * TOP]]
    if top:  # zoom: the region the best trials compete in
        spread = max(top) - min(top)
        below, above = (spread + 0.005, 0.3 * spread + 0.002)[:: 1 if maximize else -1]  # room on the worse side
        axes[1].set_ylim(min(top) - below, max(top) + above)
        axes[1].set_xlim(epochs / 2, epochs + 0.2)
        axes[1].set_title(f"zoom: the second half, the final top {len(top)}")
        axes[0].legend(fontsize=8, loc="lower right")
    axes[0].set_title(f"{study.study_name}: curves by final rank (grey dashed, x where it stopped: "
                      f"{len(pruned)} pruned)")
    fig.tight_layout()
    return fig
