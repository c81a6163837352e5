"""The Optuna extension: search model3's training settings beyond the grid (the space file says which:
optimizer and its learning rate, dropout, weight decay, schedule, batch size, label smoothing,
augmentation), as nested MLflow runs.

A sibling of the sweep on the same engine (`engine`): one study, one parent run whose id lives in the
study, so running the search again on the same storage and study resumes it, and several workers
(processes or machines) sharing the storage and tracking server fill one parent; a lost worker's trial
is retried. Each trial is a child run opened when the trial starts;
each epoch reports the validation metric to Optuna. A pruned trial's run ends KILLED with the tag
`fmnist.trial_state = PRUNED` (and no model): never FINISHED, so it cannot pass for a finished success.
A diverging trial's run ends FAILED (Optuna state FAIL). Completed trials end FINISHED (COMPLETE).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import optuna

from . import engine, parallel, runs, train, tracking
from .data import Dataset
from .schema import (ATTR_RUN, KIND_SEARCH, KIND_SWEEP, KIND_TRIAL, TAG_BEST_RUN, TAG_KIND, TAG_STATE, TAG_STUDY,
                     TAG_SWEEP, TAG_TRIAL)
from .space import Space


@dataclass(frozen=True)
class SearchSettings:
    epochs: int = 10
    subset: int = 0
    device: str = "auto"
    precision: str = "auto"  # the CLI passes the resolved value


def sampler_seed(seed: Optional[int], finished_before: int, worker: int = 0) -> Optional[int]:
    """The sampler's seed for one worker: None (fresh entropy) unless `--seed` was given; then derived from
    the seed, the trials the study already holds and the worker's index, so that a resumed study or a
    second worker does not replay the same suggestions."""
    if seed is None:
        return None
    import numpy as np

    return int(np.random.SeedSequence([seed, finished_before, worker]).generate_state(1)[0])


def make_sampler(name: str, seed: Optional[int]) -> optuna.samplers.BaseSampler:
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # constant_liar: running trials count as bad guesses, so parallel workers spread out instead of
    # suggesting the same region at once. n_startup_trials 5 (Optuna's default is 10): a 10-epoch trial
    # costs 4-10 minutes on a 2-core CPU, so a study here has ~20 trials, and its first random ones scored
    # 87-90% against 92-93% for the start points (experiments/SEARCH.md): modelling should start early.
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True, n_startup_trials=5)


def make_pruner(name: str, epochs: int) -> optuna.pruners.BasePruner:
    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs)
    if name == "median":
        # Judge a trial only after 3 trials completed and its own first 2 epochs (early epochs are noisy).
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2)
    # "percentile", the default: prune only the bottom quarter, only from epoch 4 of 10 on (the earliest
    # step Optuna prunes at is n_warmup_steps), and only once 6 trials completed. Scheduled runs (cosine,
    # onecycle) trail constant-rate runs early and overtake them at the end; the median pruner, judging
    # from epoch 2, threw such trials away (experiments/SEARCH.md has the measurements).
    return optuna.pruners.PercentilePruner(75.0, n_startup_trials=6, n_warmup_steps=max(1, epochs // 2) - 1,
                                           n_min_trials=4)


def open_study(storage_url: str, study_name: str, space: Space, sampler, pruner) -> optuna.Study:
    return engine.open_study(storage_url, study_name, space.direction, sampler, pruner)


def ensure_parent(study: optuna.Study, key: str, space: Space, experiment_id: str, settings: SearchSettings) -> str:
    """The study's parent run, created the first time (see `engine.ensure_parent`)."""
    params = {"study": study.study_name, "space_name": space.name, "metric": space.metric, "direction": space.direction,
              "epochs": settings.epochs, "subset": settings.subset}
    return engine.ensure_parent(study, key, name=study.study_name, kind=KIND_SEARCH, params=params,
                                tags=tracking.environment_tags(settings.device), experiment_id=experiment_id)


def warm_start(study: optuna.Study, space: Space, experiment_id: str) -> Optional[tuple]:
    """On a new study, enqueue the best config of the experiment's newest finished grid sweep as the first
    trial, then the space file's `start_points` (known-good recipes: they give TPE good points to model
    from before its random start-up trials run out). Returns (the enqueued params, notes on the values
    the space could not hold as the grid had them), or None."""
    if study.trials:
        return None
    sweeps = [r for r in tracking.find_runs([experiment_id], {TAG_KIND: KIND_SWEEP}, status="FINISHED")
              if TAG_BEST_RUN in r.data.tags and TAG_SWEEP in r.data.tags]
    warm = None
    if sweeps:
        best = tracking.client().get_run(sweeps[0].data.tags[TAG_BEST_RUN]).data.params
        params = space.params_for(best)
        if params:
            study.enqueue_trial(params, user_attrs={"warm_start_from": sweeps[0].data.tags[TAG_BEST_RUN]},
                                skip_if_exists=True)
            warm = params, space.clamped(best)
    enqueue_start_points(study, space)
    return warm


def enqueue_start_points(study: optuna.Study, space: Space) -> None:
    for i, point in enumerate(space.start_points):
        study.enqueue_trial(point, user_attrs={"start_point": i}, skip_if_exists=True)


def objective_for(space: Space, data: Dataset, settings: SearchSettings, parent_id: str, key: str,
                  progress: Optional[Callable] = None) -> Callable:
    def objective(trial: optuna.Trial) -> float:
        config = space.suggest(trial, epochs=settings.epochs, subset=settings.subset, device=settings.device,
                               precision=settings.precision)
        on_epoch, on_batch = progress(trial, config) if progress else (None, None)

        def on_epoch_end(metrics: dict) -> None:
            trial.report(metrics[space.metric], metrics["epoch"])
            if on_epoch is not None:
                on_epoch(metrics)
            # never prune after the last epoch: the trial has done all its work and completes with its value
            if metrics["epoch"] < settings.epochs and trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {metrics['epoch']} ({space.metric} "
                                         f"{metrics[space.metric]:.4f})")

        run_id: list = []

        def on_start(rid: str) -> None:
            run_id.append(rid)
            trial.set_user_attr(ATTR_RUN, rid)

        try:
            result = runs.tracked_fit(
                config, data, kind=KIND_TRIAL, parent_run_id=parent_id, tags={TAG_TRIAL: trial.number, TAG_STUDY: key},
                on_epoch_end=on_epoch_end, on_batch=on_batch, killed_on=(optuna.TrialPruned,), on_start=on_start,
            )
        except optuna.TrialPruned:
            tracking.set_run_tags(run_id[0], {TAG_STATE: "PRUNED"})
            raise
        except BaseException:
            if run_id:
                tracking.set_run_tags(run_id[0], {TAG_STATE: "FAIL"})
            raise
        tracking.set_run_tags(result.run_id, {TAG_STATE: "COMPLETE"})
        return result.final[space.metric]

    return objective


def prepare(space: Space, storage_url: str, study_name: str, *, experiment_id: str, settings: SearchSettings,
            sampler, pruner) -> tuple:
    """Open (or create) the study and its parent run, end runs orphaned by an earlier attempt, and
    warm-start a new study: (study, parent, key, warm)."""
    study = open_study(storage_url, study_name, space, sampler, pruner)
    key = engine.study_key(storage_url, study_name)
    parent_id = ensure_parent(study, key, space, experiment_id, settings)
    engine.reap_orphans(study, parent_id)
    return study, parent_id, key, warm_start(study, space, experiment_id)


def run_trials(study, parent_id: str, key: str, space: Space, data: Dataset, settings: SearchSettings, *,
               trials: Optional[int], timeout: Optional[float], progress: Optional[Callable] = None,
               on_trial_end: Optional[Callable] = None, on_wait: Optional[Callable[[int], None]] = None) -> int:
    """Run `trials` trials (None: until `timeout`) under the parent, open while they run (KILLED if
    interrupted); then stay to redo the trials of lost workers (see `engine.work`). Returns trials run."""
    deadline = time.monotonic() + timeout if timeout else None
    objective = objective_for(space, data, settings, parent_id, key, progress)
    callbacks = [lambda study, trial: on_trial_end(trial)] if on_trial_end else []
    with tracking.run(study.study_name, kind=KIND_SEARCH, run_id=parent_id):
        return engine.work(study, objective, more=lambda study, ran: trials is None or ran < trials,
                           catch=(train.DivergedError,), callbacks=callbacks, deadline=deadline, on_wait=on_wait)


@dataclass(frozen=True)
class WorkerJob:
    """What one worker process needs to join a prepared study (all picklable)."""

    space_file: str
    storage_url: str
    study_name: str
    parent_id: str
    key: str
    settings: SearchSettings
    trials: Optional[int]
    timeout: Optional[float]
    sampler: str
    pruner: str
    seed: Optional[int]
    data_dir: Optional[str]


def worker(job: WorkerJob) -> None:
    """Entry point of a `--jobs` worker process: load data and run `job.trials` trials of the study."""
    from .data import load
    from .space import load_space

    space = load_space(job.space_file)
    data = load(job.data_dir, subset=job.settings.subset)
    study = open_study(job.storage_url, job.study_name, space, make_sampler(job.sampler, job.seed),
                       make_pruner(job.pruner, job.settings.epochs))
    run_trials(study, job.parent_id, job.key, space, data, job.settings, trials=job.trials, timeout=job.timeout)


def run(study, storage_url: str, parent_id: str, key: str, space: Space, data: Dataset, settings: SearchSettings, *,
        trials: int, timeout: Optional[float], jobs: int, sampler: str, pruner: str, seed: Optional[int], space_file: str,
        data_dir: Optional[str], threads: int = 0, progress: Optional[Callable] = None,
        on_trial_end: Optional[Callable] = None, on_wait: Optional[Callable[[int], None]] = None) -> int:
    """Run `trials` trials of a prepared study: in this process, or split over `jobs` worker processes
    (each with its own sampler seed, see `sampler_seed`). Returns the number of workers."""
    finished_before = sum(t.state.is_finished() for t in study.trials)
    if jobs == 1:
        study.sampler = make_sampler(sampler, sampler_seed(seed, finished_before))
        run_trials(study, parent_id, key, space, data, settings, trials=trials, timeout=timeout, progress=progress,
                   on_trial_end=on_trial_end, on_wait=on_wait)
        return 1
    jobs_list = [WorkerJob(space_file, storage_url, study.study_name, parent_id, key, settings, n,
                           timeout, sampler, pruner, sampler_seed(seed, finished_before, i), data_dir)
                 for i, n in enumerate(parallel.split(trials, jobs)) if n]
    engine.run_workers(worker, [(job,) for job in jobs_list], threads)
    return len(jobs_list)


def finish(study, parent_id: str, space: Space, settings: SearchSettings):
    """Write the study's summary on its parent run; returns the summary."""
    from . import search_report

    replays = tuple(search_report.replay_pruner(study, name, lambda name=name: make_pruner(name, settings.epochs),
                                                settings.epochs) for name in ("percentile", "median"))
    engine.reap_orphans(study, parent_id)  # runs whose worker died before its trial could name them
    summary = search_report.summarize(study, parent_id, settings.epochs, replays,
                                      retried=engine.retried_count(study))
    with tracking.run(study.study_name, kind=KIND_SEARCH, run_id=parent_id):
        search_report.log(study, summary, space.metric)
    return summary
