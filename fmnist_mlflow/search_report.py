"""What a search's parent run holds: the trials as CSV, Optuna's figures, the best trial, pruning savings.

Figures come from `optuna.visualization.matplotlib` (optimization history, parameter importances, parallel
coordinates of every parameter against the metric, and dropout x learning rate as a contour, or slices
when a contour cannot be drawn yet).
"""

from __future__ import annotations

import csv
import io
import warnings
from dataclasses import dataclass
from typing import Optional

import optuna
from optuna.trial import TrialState

from . import tracking
from .schema import ATTR_RUN, TAG_BEST_RUN, TAG_BEST_TRIAL, TAG_PRUNER_REPLAY, TAG_RETRIED, TAG_TRIALS


@dataclass(frozen=True)
class SearchSummary:
    parent_run_id: str
    trials: int  # all trials of the study
    states: dict  # Optuna state name -> count
    best: Optional[dict]  # number, value, params, run_id
    epochs_run: int  # epochs trained over all finished and pruned trials
    epochs_saved: int  # epochs pruning skipped: what pruned trials would have run to the end
    replays: tuple = ()  # PrunerReplay per pruner: how it would have treated the completed trials
    retried: int = 0  # trials redone because the worker running them was lost


def summarize(study: optuna.Study, parent_run_id: str, epochs: int, replays: tuple = (), retried: int = 0) -> SearchSummary:
    trials = study.get_trials(deepcopy=False)
    states: dict = {}
    for t in trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    ran = {t.number: max(t.intermediate_values, default=0) for t in trials}
    saved = sum(epochs - ran[t.number] for t in trials if t.state == TrialState.PRUNED)
    best = None
    if any(t.state == TrialState.COMPLETE for t in trials):
        b = study.best_trial
        best = {"number": b.number, "value": b.value, "params": b.params, "run_id": b.user_attrs.get(ATTR_RUN)}
    return SearchSummary(parent_run_id, len(trials), states, best, sum(ran.values()), saved, replays, retried)


def trials_csv(study: optuna.Study) -> str:
    trials = study.get_trials(deepcopy=False)
    names = sorted({name for t in trials for name in t.params})
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["number", "state", "value", *names, "epochs_run", "seconds", ATTR_RUN])
    for t in trials:
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else ""
        writer.writerow([t.number, t.state.name, "" if t.value is None else t.value,
                         *[t.params.get(n, "") for n in names], max(t.intermediate_values, default=0),
                         seconds, t.user_attrs.get(ATTR_RUN, "")])
    return out.getvalue()


def figures(study: optuna.Study) -> dict:
    """{artifact name: Figure} for what can be drawn with the trials so far."""
    from optuna.visualization import matplotlib as ovm

    completed = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib backend experimental
        if completed:
            out["optimization_history.png"] = ovm.plot_optimization_history(study).figure
        if len(completed) >= 2:
            try:
                out["param_importances.png"] = ovm.plot_param_importances(study).figure
            except (RuntimeError, ValueError, ZeroDivisionError):
                pass  # importances need variation in the completed trials
            out["parallel_coordinate.png"] = _parallel(ovm.plot_parallel_coordinate(study))
            # Each optimizer has its own lr parameter: contour dropout against the one with most completed trials.
            counts: dict = {}
            for t in completed:
                for name in t.params:
                    if name.startswith("lr_") and "dropout" in t.params:
                        counts[name] = counts.get(name, 0) + 1
            lr = max(counts, key=counts.get) if counts else None
            if lr and counts[lr] >= 3:  # a contour needs a few points to interpolate between
                out["dropout_lr_contour.png"] = _figure(ovm.plot_contour(study, params=["dropout", lr]))
            else:
                out["dropout_lr_slice.png"] = _figure(ovm.plot_slice(study))
    return out


def _parallel(axes):
    """Optuna's parallel-coordinates figure, wide enough for a dozen parameters' labels."""
    fig = axes.figure
    fig.set_size_inches(max(10.0, 1.1 * len(axes.get_xticks())), 6.0)
    fig.tight_layout()
    return fig


def _figure(axes):
    import numpy as np

    first = np.asarray(axes).flat[0] if not hasattr(axes, "figure") else axes
    return first.figure


def log(study: optuna.Study, summary: SearchSummary, metric: str) -> None:
    """Log the summary on the active (parent) run and tag the best trial's run."""
    tracking.log_text(trials_csv(study), "trials.csv")
    for name, fig in figures(study).items():
        tracking.log_figure(fig, name)
    tags = {TAG_TRIALS: summary.trials, TAG_RETRIED: summary.retried, **{f"{TAG_TRIALS}_{k.lower()}": v for k, v in summary.states.items()},
            **{f"{TAG_PRUNER_REPLAY}.{r.pruner}": replay_line(r) for r in summary.replays}}
    metrics = {"epochs_run": summary.epochs_run, "pruned_epochs_saved": summary.epochs_saved}
    if summary.best:
        b = summary.best
        tags.update({TAG_BEST_RUN: b["run_id"] or "", "best_trial": b["number"],
                     **{f"best_{k}": v for k, v in b["params"].items()}})
        metrics[f"best_{metric}"] = b["value"]
        if b["run_id"]:
            tracking.set_run_tags(b["run_id"], {TAG_BEST_TRIAL: "true"})
    tracking.set_tags({k: str(v) for k, v in tags.items()})
    tracking.log_metrics(metrics)



def replay_line(r) -> str:
    return (f"would stop {r.would_prune} of {r.completed} completed trials ({r.epochs_saved} epochs saved), "
            f"{r.good_pruned} of them among the {r.good} best (top half)")


@dataclass(frozen=True)
class PrunerReplay:
    """How a pruner would have treated the study's completed trials, each judged against the others."""

    pruner: str
    completed: int  # completed trials replayed
    would_prune: int  # of them, how many the pruner would have stopped early
    good: int  # completed trials in the top half by final value
    good_pruned: int  # good trials the pruner would have stopped: the cost of pruning
    epochs_saved: int  # epochs it would have skipped over the completed trials


def replay_pruner(study: optuna.Study, name: str, make_pruner, epochs: int) -> PrunerReplay:
    """Replay a pruner (Optuna's own, fresh from `make_pruner()` for each trial) on each completed trial's
    curve, leave-one-out: the other completed trials stand in for those that would have run before it."""
    completed = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                 if len(t.intermediate_values) >= epochs]
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    ranked = sorted(completed, key=lambda t: t.value, reverse=maximize)
    good = {t.number for t in ranked[: max(1, len(ranked) // 2)]} if ranked else set()
    would, good_pruned, saved = 0, 0, 0
    for trial in completed:
        others = optuna.create_study(direction=study.direction, pruner=make_pruner())
        for other in completed:
            if other.number != trial.number:
                others.add_trial(optuna.trial.create_trial(
                    params=other.params, distributions=other.distributions, value=other.value,
                    intermediate_values=dict(other.intermediate_values)))
        replayed = others.ask()
        for step in range(1, epochs):  # never after the last epoch, as in the search
            replayed.report(trial.intermediate_values[step], step)
            if replayed.should_prune():
                would += 1
                good_pruned += trial.number in good
                saved += epochs - step
                break
    return PrunerReplay(name, len(completed), would, len(good), good_pruned, saved)
