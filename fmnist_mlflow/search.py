"""The Optuna extension: search dropout rate and learning rate beyond the grid, as nested MLflow runs.

One study, one parent run: the parent's id lives in the study's user attributes, so running the search
again on the same storage and study resumes it, and several workers (processes or machines) sharing the
storage and tracking server fill one parent. Each trial is a child run opened when the trial starts;
each epoch reports the validation metric to Optuna. A pruned trial's run ends KILLED with the tag
`fmnist.trial_state = PRUNED` (and no model): never FINISHED, so it cannot pass for a finished success.
A diverging trial's run ends FAILED (Optuna state FAIL). Completed trials end FINISHED (COMPLETE).
"""

from __future__ import annotations

import hashlib
import os
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import optuna

from . import runs, train, tracking
from .data import Dataset
from .search_report import ATTR_RUN
from .space import Space
from .sweep import TAG_BEST_RUN, TAG_SWEEP
from .errors import FmnistError

ATTR_PARENT = "mlflow_parent_run_id"
TAG_STUDY = "fmnist.study"
TAG_TRIAL = "fmnist.trial"
TAG_STATE = "fmnist.trial_state"

optuna.logging.set_verbosity(optuna.logging.WARNING)


class SearchError(FmnistError, RuntimeError):
    """The Optuna storage cannot be used; the message names it (password hidden)."""


@dataclass(frozen=True)
class SearchSettings:
    epochs: int = 10
    subset: int = 0
    device: str = "auto"
    precision: str = "fp32"


redact = tracking.redact


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage from a URL: sqlite:///, postgresql://, mysql://, or journal:PATH (a log file)."""
    from pathlib import Path

    if url.startswith("journal:"):
        path = Path(url[len("journal:") :])
        if not path.parent.is_dir():
            raise SearchError(f"Optuna storage {url}: folder {path.parent} does not exist")
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    scheme = url.split(":", 1)[0]
    if "://" not in url or scheme.split("+")[0] not in ("sqlite", "postgresql", "mysql"):
        raise SearchError(
            f"Optuna storage {redact(url)!r} is not a storage URL; use sqlite:///FILE, "
            "postgresql://USER@HOST:PORT/DB or journal:FILE"
        )
    # A bounded wait: an unreachable database fails in seconds; sqlite waits for a busy writer instead.
    connect_args = {"timeout": 60} if scheme.startswith("sqlite") else {"connect_timeout": 10}
    for attempt in range(5):
        try:
            interval = heartbeat_interval()
            warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeat's
            return optuna.storages.RDBStorage(
                url, engine_kwargs={"connect_args": connect_args}, heartbeat_interval=interval,
                grace_period=GRACE_FACTOR * interval, heartbeat_stale_trial_callback=lost_worker_callback)
        except Exception as exc:  # SQLAlchemy and driver errors come in many types
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if ("already exists" in reason or "UNIQUE constraint" in reason) and attempt < 4:
                time.sleep(0.5)  # another worker is creating the schema of a new storage right now
                continue
            raise SearchError(f"cannot open Optuna storage {redact(url)}: {reason}") from None


def sampler_seed(seed: Optional[int], finished_before: int, worker: int = 0) -> Optional[int]:
    """The sampler's seed for one worker: None (fresh entropy) unless `--seed` was given; then derived from
    the seed, the trials the study already holds and the worker's index, so that a resumed study or a
    second worker does not replay the same suggestions."""
    if seed is None:
        return None
    import numpy as np

    return int(np.random.SeedSequence([seed, finished_before, worker]).generate_state(1)[0])


# Lost workers: every running trial beats every `heartbeat_interval()` seconds; a trial silent for
# GRACE_FACTOR beats (a worker killed with SIGKILL, out of memory, or a machine gone) is failed by the next
# worker that starts a trial, or by the next `fmnist search` on the study, and retried once.
HEARTBEAT_S = 30
GRACE_FACTOR = 3
LOST_REASON = "worker lost: no heartbeat from the process running this trial (killed, or its machine gone)"


def heartbeat_interval() -> int:
    return int(os.environ.get("FMNIST_HEARTBEAT_S", HEARTBEAT_S))


def lost_worker_callback(study: optuna.Study, trial) -> None:
    """Optuna failed a stale trial: end its MLflow run KILLED with the reason, then retry its config once."""
    run_id = trial.user_attrs.get(ATTR_RUN)
    if run_id:
        tracking.end_run_as(run_id, "KILLED", LOST_REASON, {TAG_STATE: "FAIL"})
    optuna.storages.RetryFailedTrialCallback(max_retry=1)(study, trial)


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


def study_key(storage_url: str, study_name: str) -> str:
    """Tags the parent with the study it belongs to, without putting the storage URL in MLflow."""
    return f"{study_name}@{hashlib.sha256(storage_url.encode()).hexdigest()[:8]}"


def open_study(storage_url: str, study_name: str, space: Space, sampler, pruner) -> optuna.Study:
    storage = open_storage(storage_url)
    try:
        return optuna.create_study(storage=storage, study_name=study_name, direction=space.direction,
                                   sampler=sampler, pruner=pruner, load_if_exists=True)
    except ValueError as exc:  # e.g. an existing study with the other direction
        raise SearchError(f"study {study_name!r} in {redact(storage_url)}: {exc}") from None


def ensure_parent(study: optuna.Study, key: str, space: Space, experiment_id: str, settings: SearchSettings) -> str:
    """The study's parent run, creating it the first time.

    Workers that start together may each create one; all then elect the oldest and the others delete
    theirs, so every worker settles on the same parent.
    """
    parent = study.user_attrs.get(ATTR_PARENT)
    if parent:
        if tracking.inside_mlflow_run():  # close `mlflow run`'s own run, pointing at the study's parent
            tracking.create_run(study.study_name, kind="search-launcher", tags={TAG_STUDY: key, "fmnist.parent": parent},
                                params={"study": study.study_name})
        return parent
    params = {"study": study.study_name, "space_name": space.name, "metric": space.metric, "direction": space.direction,
              "epochs": settings.epochs, "subset": settings.subset}
    tags = {TAG_STUDY: key, **tracking.environment_tags(settings.device)}
    mine = tracking.create_run(study.study_name, kind="search", tags=tags, params=params, experiment_id=experiment_id)
    rivals = tracking.find_runs([experiment_id], {TAG_STUDY: key, tracking.TAG_KIND: "search"})
    winner = min(rivals, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id if rivals else mine
    if winner != mine:
        tracking.delete_run(mine)
    study.set_user_attr(ATTR_PARENT, winner)
    return winner


def warm_start(study: optuna.Study, space: Space, experiment_id: str) -> Optional[dict]:
    """On a new study, enqueue the best config of the experiment's newest finished grid sweep as the first
    trial, then the space file's `start_points` (known-good recipes: they give TPE good points to model
    from before its random start-up trials run out)."""
    if study.trials:
        return None
    sweeps = [r for r in tracking.find_runs([experiment_id], {tracking.TAG_KIND: "sweep"}, status="FINISHED")
              if TAG_BEST_RUN in r.data.tags and TAG_SWEEP in r.data.tags]
    params = None
    if sweeps:
        best = tracking.client().get_run(sweeps[0].data.tags[TAG_BEST_RUN]).data.params
        params = space.params_for(best)
        if params:
            study.enqueue_trial(params, user_attrs={"warm_start_from": sweeps[0].data.tags[TAG_BEST_RUN]},
                                skip_if_exists=True)
    enqueue_start_points(study, space)
    return params


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
                config, data, kind="trial", parent_run_id=parent_id, tags={TAG_TRIAL: trial.number, TAG_STUDY: key},
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


def optimize(study: optuna.Study, objective: Callable, trials: Optional[int], timeout: Optional[float],
             on_trial_end: Optional[Callable] = None) -> None:
    callbacks = [lambda study, trial: on_trial_end(trial)] if on_trial_end else None
    study.optimize(objective, n_trials=trials, timeout=timeout, catch=(train.DivergedError,), callbacks=callbacks)


def prepare(space: Space, storage_url: str, study_name: str, *, experiment_id: str, settings: SearchSettings,
            sampler, pruner) -> tuple:
    """Open (or create) the study and its parent run, and warm-start a new study: (study, parent, key, warm)."""
    study = open_study(storage_url, study_name, space, sampler, pruner)
    key = study_key(storage_url, study_name)
    parent_id = ensure_parent(study, key, space, experiment_id, settings)
    return study, parent_id, key, warm_start(study, space, experiment_id)


def run_trials(study, parent_id: str, key: str, space: Space, data: Dataset, settings: SearchSettings, *,
               trials: Optional[int], timeout: Optional[float], progress: Optional[Callable] = None,
               on_trial_end: Optional[Callable] = None) -> None:
    """Run trials under the parent (open while they run; KILLED if interrupted)."""
    with tracking.run(study.study_name, kind="search", run_id=parent_id):
        objective = objective_for(space, data, settings, parent_id, key, progress)
        optimize(study, objective, trials, timeout, on_trial_end)


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


def finish(study, parent_id: str, space: Space, settings: SearchSettings):
    """Write the study's summary on its parent run; returns the summary."""
    from . import search_report

    replays = tuple(search_report.replay_pruner(study, name, lambda name=name: make_pruner(name, settings.epochs),
                                                settings.epochs) for name in ("percentile", "median"))
    summary = search_report.summarize(study, parent_id, settings.epochs, replays)
    with tracking.run(study.study_name, kind="search", run_id=parent_id):
        search_report.log(study, summary, space.metric)
    return summary
