"""What a search's parent run holds: the trials as CSV, Optuna's figures, the best trial, pruning savings.

Figures come from `optuna.visualization.matplotlib` (optimization history, parameter importances, parallel
coordinates of every parameter against the metric, and dropout x learning rate as a contour, or slices
when a contour cannot be drawn yet).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import optuna
from optuna.trial import TrialState

from ..schema import (ATTR_RUN, TAG_BEST_RUN, TAG_BEST_TRIAL, TAG_CONFIRM_STUDY, TAG_PRUNER_REPLAY, TAG_RETRIED,
                      TAG_STOPPED, TAG_TRIALS)
from ..tracking import records
from ..tracking.queries import get_run
from ..tracking.runs import set_run_tags
from . import fidelity, pruners


@dataclass(frozen=True)
class SearchSummary:
    parent_run_id: str
    trials: int  # all trials of the study
    states: dict  # Optuna state name -> count
    best: Optional[dict]  # number, value, params, run_id
    epochs_run: int  # epochs trained over all finished and pruned trials
    epochs_saved: int  # epochs pruning skipped: what pruned trials would have run to the end
    replays: tuple = ()  # pruners.Replay per candidate pruner: what it would have stopped of the completed trials
    retried: int = 0  # trials redone because the worker running them was lost
    stopped: str = ""  # why the study stopped itself (`stopping`), if it did


def summarize(study: optuna.Study, parent_run_id: str, epochs: int, replays: tuple = (), retried: int = 0,
              stopped: str = "") -> SearchSummary:
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
    return SearchSummary(parent_run_id, len(trials), states, best, sum(ran.values()), saved, replays, retried, stopped)


def trials_csv(study: optuna.Study) -> str:
    """Every trial as a row (Optuna's `trials_dataframe`: number, state, value, params, user attributes,
    times), with the epochs it ran and its MLflow run beside it."""
    frame = study.trials_dataframe(attrs=("number", "state", "value", "params", "duration", "user_attrs"))
    if frame.empty:
        return ""
    frame["epochs_run"] = [max(t.intermediate_values, default=0) for t in study.get_trials(deepcopy=False)]
    frame["seconds"] = frame.pop("duration").dt.total_seconds()
    frame.columns = [c.removeprefix("params_").removeprefix("user_attrs_") for c in frame.columns]
    return frame.to_csv(index=False, lineterminator="\n")


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
            parallel = _parallel(ovm, study, completed)
            if parallel is not None:
                out["parallel_coordinate.png"] = parallel
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


def _parallel(ovm, study: optuna.Study, completed: list):
    """Optuna's parallel coordinates of the completed trials of the most tried optimizer (each optimizer has
    its own learning-rate parameter: across optimizers every line would cross a "None" on the others'), on
    the parameters that vary among them, with labels that do not overlap; None when fewer than 2 such trials."""
    by_optimizer: dict = {}
    for t in completed:
        by_optimizer.setdefault(t.params.get("optimizer"), []).append(t)
    optimizer, trials = max(by_optimizer.items(), key=lambda item: len(item[1]))
    if len(trials) < 2:
        return None
    names = sorted(set.intersection(*(set(t.params) for t in trials)))
    params = [p for p in names if len({repr(t.params[p]) for t in trials}) > 1]
    if not params:
        return None
    # Optuna's own figure of an in-memory study holding those trials alone
    chosen = optuna.create_study(direction=study.direction, study_name=study.study_name)
    chosen.add_trials(trials)
    chosen.set_metric_names(study.metric_names or ["value"])
    axes = ovm.plot_parallel_coordinate(chosen, params=params)
    fig = axes.figure
    for label in axes.get_xticklabels():
        label.set_rotation(30)
        label.set_horizontalalignment("right")
    which = f"optimizer {optimizer}: " if optimizer is not None else ""
    axes.set_title(f"{which}{len(trials)} of {len(completed)} completed trials; params that vary among them")
    fig.set_size_inches(max(10.0, 1.2 * len(params) + 2), 6.5)  # 1.2 in per axis: rotated labels stay apart
    fig.tight_layout()
    return fig


def _figure(axes):
    import numpy as np

    first = np.asarray(axes).flat[0] if not hasattr(axes, "figure") else axes
    return first.figure


def log(study: optuna.Study, summary: SearchSummary, metric: str, epochs: int) -> None:
    """Log the summary on the active (parent) run and tag the best trial's run: the trials, every curve,
    what early epochs say (`fidelity`), what each pruner would have stopped, and the figures."""
    texts = {"trials.csv": trials_csv(study), "curves.csv": fidelity.curves_csv(study),
             "early_epochs.md": fidelity.markdown(fidelity.early_epochs(study, epochs), metric) + "\n"
             + replays_markdown(summary.replays)}
    plots = {**figures(study), "curves.png": fidelity.figure(study, epochs, metric)}
    tags = {TAG_TRIALS: summary.trials, TAG_RETRIED: summary.retried, **{f"{TAG_TRIALS}_{k.lower()}": v for k, v in summary.states.items()},
            **{f"{TAG_PRUNER_REPLAY}.{r.pruner}": r.line() for r in summary.replays},
            **({TAG_STOPPED: summary.stopped} if summary.stopped else {})}
    metrics = {"epochs_run": summary.epochs_run, "pruned_epochs_saved": summary.epochs_saved}
    if TAG_CONFIRM_STUDY not in get_run(summary.parent_run_id).data.tags:  # a confirm's answer stays until the next
        tags["mlflow.note.content"] = description(summary, metric)
    if summary.best:
        b = summary.best
        tags.update({TAG_BEST_RUN: b["run_id"] or "", "best_trial": b["number"],
                     **{f"best_{k}": v for k, v in b["params"].items()}})
        metrics[f"best_{metric}"] = b["value"]
        if b["run_id"]:
            set_run_tags(b["run_id"], {TAG_BEST_TRIAL: "true"})
    records.log_report(texts=texts, figures=plots, tags=tags, metrics=metrics)


def search_line(summary: SearchSummary) -> str:
    """What a search ran, in one sentence (its parent's description says it, before and after a confirm)."""
    states = ", ".join(f"{n} {state.lower()}" for state, n in sorted(summary.states.items()))
    return f"The search: {summary.trials} trial(s) ({states})" + (f"; it {summary.stopped}" if summary.stopped else "") + "."


def description(summary: SearchSummary, metric: str) -> str:
    """The search parent's description until a confirm names a champion: what ran, and its best single seed."""
    from ..tracking.links import ui_page
    from .space import brief_params

    lines = [search_line(summary)]
    if summary.best:
        b = summary.best
        link = f" ([its run]({ui_page(b['run_id']).lstrip('/')}))" if b["run_id"] else ""
        lines += ["", f"**Best trial on its one seed: trial {b['number']}**, {metric} {b['value']:.4f}{link}: "
                      f"{brief_params(b['params'])}. Not a champion yet: one seed's winner is partly the luckiest; "
                      "`fmnist search --trials 0 --confirm K` re-runs the best and the baselines on fresh seeds."]
    return "\n".join(lines) + "\n"


def replays_markdown(replays: tuple) -> str:
    """The candidate pruners replayed on the study's completed trials, as a table."""
    lines = ["Each pruner replayed on the completed trials in the order they started (`pruners.replay`):", "",
             "| pruner | what it does | first epoch it can stop | trials stopped | trial-epochs saved | final top trials stopped |",
             "|---|---|---|---|---|---|"]
    for r in replays:
        p = pruners.CATALOGUE[r.pruner]
        lost = ", ".join(str(n) for n in r.top_stopped) or "none"
        lines.append(f"| {r.pruner} | {p.what} | {p.first_epoch(r.epochs)} | {len(r.stopped)} of {r.trials} | "
                     f"{r.epochs_saved} of {r.trials * r.epochs} ({100 * r.share_saved:.0f}%) | {lost} |")
    return "\n".join(lines) + "\n"
