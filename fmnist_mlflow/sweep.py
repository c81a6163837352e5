"""The fixed grid as an Optuna study driven by GridSampler, logged as nested MLflow runs: one parent per
sweep, one child per (config, seed); resumable, and shared by any number of workers.

Each grid point is one (config, seed), named by its digest. The study (by default `<grid>-<digest>-<experiment stamp>`
in sqlite:///optuna.db) records which points are taken and done; every `fmnist sweep` on the same storage,
study and tracking server takes the next free point from it, so N workers on N machines share one grid
and no point runs twice to completion. GridSampler hands points out in grid order: seed by seed (a partial
sweep still compares every config on the same seeds), slow model3 first (parallel workers end together).
Running the sweep again resumes it: FINISHED points are skipped, failed ones are queued again. A config
that diverges fails alone. A worker that is lost has its point retried by the others (see `engine`). When
no point is left, the parent gets the summary table (CSV, Markdown), the loss curves per loss function,
the accuracy chart, and the best config by the selection metric (as tags and metrics: a resumed sweep may
change its best, and MLflow params cannot change).
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import optuna
from optuna.trial import TrialState

from . import engine, plots, runs, summary, tracking, train
from .config import RunConfig
from .data import Dataset
from .grid import Grid, sweep_digest
from .schema import (DEFAULT_STORAGE, ATTR_CONFIG, TAG_BEST_GROUP, ATTR_DUPLICATE, ATTR_RUN, ATTR_SWEEP, KIND_SWEEP, KIND_SWEEP_CHILD, TAG_BEST_RUN,
                     TAG_CONFIG_HASH, TAG_FAILED_CONFIGS, TAG_RETRIED, TAG_SELECT, TAG_STUDY, TAG_SWEEP, TAG_TRIAL)

PARAM = "config"  # the grid's one Optuna parameter: the digest of a (config, seed)

# (index among the points this process ran, points left when it started, config, seconds elapsed,
# estimated seconds left or None)
StartCallback = Callable[[int, int, RunConfig, float, Optional[float]], None]
# config -> (on_epoch_end, on_batch) for that config's run
ProgressFactory = Callable[[RunConfig], tuple]


@dataclass
class SweepResult:
    parent_run_id: str
    rows: list  # summary rows, one per (config, seed), in grid order
    configs: list  # summary.ConfigRow per config, aggregated over seeds
    best: Optional[summary.ConfigRow]  # best config by the seed mean of the selection metric
    skipped: int  # (config, seed) runs already FINISHED before this command started
    failed: list = field(default_factory=list)  # rows of runs that did not finish
    markdown: str = ""
    histories: dict = field(default_factory=dict)  # (model, loss, optimizer) -> {seed: per-epoch metrics}
    retried: int = 0  # points redone because the worker running them was lost
    study_name: str = ""


class OrderedGridSampler(optuna.samplers.GridSampler):
    """GridSampler that hands out its points in the order given: Optuna shuffles them (to spread a grid cut
    short by n_trials), which would break the seed-by-seed order. Every worker builds the same order."""

    def __init__(self, points: list):
        super().__init__({PARAM: points})
        self.points = list(points)
        self._all_grids = list(itertools.product(*self._search_space.values()))


def grid_order(configs: list) -> list:
    """Seed by seed, model3 (the slowest) first within a seed; otherwise the grid file's order."""
    return sorted(configs, key=lambda c: (c.seed, c.model != "model3"))


def default_study_name(grid: Grid, configs: list, experiment_id: str) -> str:
    """`<grid>-<digest of its configs>-<stamp of the experiment>`: the same grid logged to another
    experiment, or to a new tracking store beside an old optuna.db, is another sweep with its own parent;
    workers on one tracking server agree on all three."""
    return f"{grid.name}-{sweep_digest(configs)[:8]}-{tracking.experiment_stamp(experiment_id)}"


@dataclass(frozen=True)
class SweepJob:
    """What one `--jobs` worker process needs to join a prepared sweep (all picklable)."""

    grid_name: str
    configs: tuple
    storage_url: str
    study_name: str
    parent_id: str
    key: str
    select: str
    data_dir: Optional[str]


def run_sweep(
    grid: Grid,
    configs: list,
    data: Dataset,
    *,
    experiment_id: str,
    storage_url: str = DEFAULT_STORAGE,
    study_name: Optional[str] = None,
    select: str = "val_accuracy",
    on_start: Optional[StartCallback] = None,
    progress: Optional[ProgressFactory] = None,
    on_wait: Optional[Callable[[int], None]] = None,
    jobs: int = 1,
    data_dir: Optional[str] = None,
    threads: int = 0,
    on_workers: Optional[Callable[[int], None]] = None,
) -> SweepResult:
    """Run the points of `configs` still to do under the sweep's parent run and summarize them on it.

    This process is one worker; with `jobs > 1` it starts that many worker processes instead (each loads
    the data itself, from `data_dir`). Other `fmnist sweep` commands on the same storage and study share
    the points.
    """
    study_name = study_name or default_study_name(grid, configs, experiment_id)
    study, parent_id, key = open_sweep(grid, configs, storage_url, study_name, experiment_id, select)
    done_before = len(completed(study))
    engine.reap_orphans(study, parent_id)
    queue_failed(study, grid_order(configs))
    todo = len(configs) - done_before
    if jobs > 1 and todo > 1:
        job = SweepJob(grid.name, tuple(configs), storage_url, study_name, parent_id, key, select, data_dir)
        if on_workers is not None:
            on_workers(min(jobs, todo))
        engine.run_workers(worker, [(job, data.subset)] * min(jobs, todo), threads)
    else:
        with tracking.run(grid.name, kind=KIND_SWEEP, run_id=parent_id):
            objective = objective_for(configs, data, parent_id, key, select, on_start, progress, todo=todo)
            engine.work(study, objective, more=points_left, catch=(train.DivergedError,), on_wait=on_wait)
    engine.reap_orphans(study, parent_id)  # runs whose worker died before its trial could name them
    result = summarize(parent_id, configs, select)
    result.skipped, result.study_name = done_before, study_name
    result.retried = engine.retried_count(study)
    if result.retried:
        result.markdown += (f"\n\n{result.retried} (config, seed) run(s) were retried after the worker running them "
                            "was lost (their first runs ended KILLED, `fmnist.failure_reason` \"worker lost\").\n")
    with tracking.run(grid.name, kind=KIND_SWEEP, run_id=parent_id):
        log_summary(result, select)
    return result


def open_sweep(grid: Grid, configs: list, storage_url: str, study_name: str, experiment_id: str,
               select: str) -> tuple:
    """The sweep's study and parent run, created the first time: (study, parent_id, key)."""
    digest = sweep_digest(configs)
    study = open_grid_study(storage_url, study_name, configs, select)
    held = study.user_attrs.get(ATTR_SWEEP)
    if held is None:
        study.set_user_attr(ATTR_SWEEP, digest)
    elif held != digest:
        raise engine.StorageError(
            f"study {study_name!r} in {engine.redact(storage_url)} holds another grid (digest {held}, this one "
            f"{digest}): every worker needs the same grid file, --seeds, --epochs, --subset and --precision")
    key = engine.study_key(storage_url, study_name)
    parent_id = engine.ensure_parent(
        study, key, name=grid.name, kind=KIND_SWEEP, params=sweep_params(grid, configs),
        tags={TAG_SWEEP: digest, **tracking.environment_tags(configs[0].device)}, experiment_id=experiment_id)
    return study, parent_id, key


def open_grid_study(storage_url: str, study_name: str, configs: list, select: str) -> optuna.Study:
    sampler = OrderedGridSampler([c.digest() for c in grid_order(configs)])
    return engine.open_study(storage_url, study_name, summary.direction(select), sampler)


def completed(study: optuna.Study) -> set:
    return {t.params[PARAM] for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}


def points_left(study: optuna.Study, ran: int) -> bool:
    """Whether a point is still free: one never handed out, or one queued again (failed, or retried)."""
    trials = study.get_trials(deepcopy=False)
    if any(t.state == TrialState.WAITING for t in trials):
        return True
    taken = {t.system_attrs.get("grid_id") for t in trials}
    return any(i not in taken for i in range(len(study.sampler.points)))


def queue_failed(study: optuna.Study, ordered: list) -> int:
    """Queue again the points handed out before whose trials all failed (diverged, interrupted, or their
    process lost the tracking server): a resumed sweep runs them. Returns how many."""
    trials = study.get_trials(deepcopy=False)
    busy = {t.params.get(PARAM) for t in trials if t.state in (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)}
    points = [c.digest() for c in ordered]
    handed_out = {t.params.get(PARAM) for t in trials}
    distribution = optuna.distributions.CategoricalDistribution(points)
    queued = 0
    for grid_id, config in enumerate(ordered):
        point = points[grid_id]
        if point in handed_out and point not in busy:
            study.add_trial(optuna.trial.create_trial(
                state=TrialState.WAITING, params={PARAM: point}, distributions={PARAM: distribution},
                user_attrs={ATTR_CONFIG: label(config)},
                system_attrs={"grid_id": grid_id, "search_space": {PARAM: points}}))
            queued += 1
    return queued


def label(config) -> str:
    return f"{config.label} seed {config.seed}"


def taken_by(study: optuna.Study, trial_number: int, point: str) -> Optional[int]:
    """Another trial that has done, or is doing, this point first: GridSampler hands out a point twice when
    workers race for the last ones (documented, and still so in Optuna 5)."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)):
        if t.number != trial_number and t.params.get(PARAM) == point and (
                t.state == TrialState.COMPLETE or t.number < trial_number):
            return t.number
    return None


def objective_for(configs: list, data: Dataset, parent_id: str, key: str, select: str,
                  on_start: Optional[StartCallback] = None, progress: Optional[ProgressFactory] = None,
                  todo: int = 0) -> Callable:
    by_point = {c.digest(): c for c in configs}
    points = [c.digest() for c in grid_order(configs)]
    started = time.monotonic()
    ran = [0]

    def objective(trial: optuna.Trial) -> float:
        point = trial.suggest_categorical(PARAM, points)
        config = by_point[point]
        trial.set_user_attr(ATTR_CONFIG, label(config))
        first = taken_by(trial.study, trial.number, point)
        if first is not None:
            trial.set_user_attr(ATTR_DUPLICATE, first)
            raise optuna.TrialPruned(f"{label(config)} is trial {first}'s: not run twice")
        if on_start is not None:
            k, elapsed = ran[0], time.monotonic() - started
            on_start(k, max(todo, k + 1), config, elapsed, elapsed / k * (todo - k) if k and todo > k else None)
        ran[0] += 1
        on_epoch_end, on_batch = progress(config) if progress else (None, None)
        result = runs.tracked_fit(
            config, data, kind=KIND_SWEEP_CHILD, parent_run_id=parent_id,
            tags={TAG_TRIAL: trial.number, TAG_STUDY: key}, on_epoch_end=on_epoch_end, on_batch=on_batch,
            on_start=lambda run_id: trial.set_user_attr(ATTR_RUN, run_id))
        # A diverging config fails alone (its run ended FAILED with the reason; `catch` keeps the worker
        # going). Anything else (the tracking server gone, out of memory) would fail every config alike:
        # it stops the worker.
        return result.final[select]

    return objective


def worker(job: SweepJob, subset: int) -> None:
    """Entry point of a `--jobs` worker process: load the data and work on the sweep's study."""
    from .data import load

    data = load(job.data_dir, subset=subset)
    configs = list(job.configs)
    study = open_grid_study(job.storage_url, job.study_name, configs, job.select)
    def on_start(k, n, config, elapsed, eta) -> None:
        print(f"worker {os.getpid()}: {label(config)} (its config {k + 1})", flush=True)

    with tracking.run(job.grid_name, kind=KIND_SWEEP, run_id=job.parent_id):
        objective = objective_for(configs, data, job.parent_id, job.key, job.select, on_start)
        engine.work(study, objective, more=points_left, catch=(train.DivergedError,))


def sweep_params(grid: Grid, configs: list) -> dict:
    first = configs[0]
    return {
        "grid_name": grid.name, "grid_file": os.path.basename(grid.source), "configs": len(configs),
        "epochs": first.epochs, "batch_size": first.batch_size,
        "seeds": ",".join(str(s) for s in sorted({c.seed for c in configs})), "subset": first.subset,
        "device": first.device,
    }  # fmt: skip


def summarize(parent_id: str, configs: list, select: str) -> SweepResult:
    """One row per (config, seed) from its newest child (a FINISHED one if any), in grid order."""
    by_hash: dict = {}
    for child in tracking.child_runs(parent_id):  # newest first
        key = child.data.tags.get(TAG_CONFIG_HASH)
        if key not in by_hash or (by_hash[key].info.status != "FINISHED" and child.info.status == "FINISHED"):
            by_hash[key] = child
    rows, histories = [], {}
    for config in configs:
        child = by_hash.get(config.digest())
        if child is None:
            rows.append(summary.row(config, "NOT RUN", [], ""))
            continue
        history = tracking.history(child.info.run_id)
        if child.info.status == "FINISHED":
            histories.setdefault((config.model, config.loss, config.optimizer), {})[config.seed] = history
        rows.append(summary.row(config, child.info.status, history, child.info.run_id))
    aggregated = summary.aggregate(rows, select)
    return SweepResult(parent_run_id=parent_id, rows=rows, configs=aggregated, best=summary.best(aggregated),
                       skipped=0, failed=[r for r in rows if r["status"] != "FINISHED"],
                       markdown=summary.to_markdown(rows, select), histories=histories)


def log_summary(result: SweepResult, select: str) -> None:
    tracking.log_text(summary.to_csv(result.rows), "summary.csv")
    tracking.log_text(summary.configs_csv(result.configs, select), "summary_by_config.csv")
    tracking.log_text(result.markdown, "summary.md")
    if result.histories:
        tracking.log_figure(plots.sweep_curves(result.histories), "loss_curves.png")
    done = [c for c in result.configs if c.val_accuracy is not None]
    if done:
        tracking.log_figure(plots.accuracy_bars(done), "val_accuracy.png")
    failed = [f"{r['model']}-{r['loss']}-{r['optimizer']}" + (f" seed {r['seed']}" if len(result.rows) > len(result.configs) else "")
              for r in result.failed]
    tags = {TAG_FAILED_CONFIGS: ", ".join(failed) or "none", TAG_SELECT: select, TAG_RETRIED: str(result.retried)}
    if result.best:
        b = result.best
        tied = [c.name for c in result.configs if c.same_as_best and not c.is_best]
        tags.update({TAG_BEST_RUN: b.best_run_id, "best_model": b.model, "best_loss": b.loss,
                     "best_optimizer": b.optimizer, "best_lr": str(b.lr), TAG_BEST_GROUP: b.group,
                     "best_n_seeds": str(len(b.seeds)), "best_indistinguishable": ", ".join(tied) or "none"})
        metrics = {"best_val_accuracy": b.val_accuracy.mean, "best_val_nll": b.val_nll.mean}
        if b.val_accuracy.std is not None:
            metrics.update({"best_val_accuracy_std": b.val_accuracy.std, "best_val_accuracy_ci95_low": b.val_accuracy.ci95[0],
                            "best_val_accuracy_ci95_high": b.val_accuracy.ci95[1]})
        tracking.log_metrics(metrics)
    tracking.set_tags(tags)
