"""The engine under the sweep and the search: an Optuna study on shared storage, its MLflow parent run,
workers that take trials from it, and the recovery of lost workers.

Any number of workers (the processes of one command with `--jobs N`, or commands started on other
machines) that share the storage and the tracking server work on one study and log under one parent run,
whose id lives in the study. Every running trial beats every `heartbeat_interval()` seconds; a trial
silent for GRACE_FACTOR beats (its worker killed with SIGKILL, out of memory, its machine gone) is failed
by another worker, its MLflow run ended KILLED with the reason, and its params retried once. A worker with
nothing left to start stays while other trials run, to notice such a loss and run the retry, so that the
last worker standing finishes the study.
"""

from __future__ import annotations

import hashlib
import os
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import optuna
from optuna.storages._heartbeat import is_heartbeat_enabled  # what fail_stale_trials itself checks
from optuna.trial import TrialState

from . import parallel, tracking
from .errors import FmnistError
from .schema import (ATTR_PARENT, ATTR_RUN, KIND_LAUNCHER, KIND_SWEEP_CHILD, KIND_TRIAL, TAG_KIND,
                     TAG_PARENT, TAG_STATE, TAG_STUDY, TAG_TRIAL)

# Optuna logs each failed trial as a warning with its traceback; the run's failure reason and the CLI's
# one-line error already say what happened.
optuna.logging.set_verbosity(optuna.logging.ERROR)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats, retry callback

redact = tracking.redact

HEARTBEAT_S = 30
GRACE_FACTOR = 3  # beats a trial may miss before it counts as lost (a busy database can delay one)
LOST_REASON = "worker lost: no heartbeat from the process running this trial (killed, or its machine gone)"
ORPHAN_REASON = ("orphaned: found RUNNING when its study resumed, with its trial already ended (its process "
                 "lost the tracking server, or was killed before heartbeats could tell)")


# What a database says when two workers create a new storage's tables at once (sqlite; PostgreSQL's
# catalog, seen with three workers starting together); the loser retries and finds the tables there.
SCHEMA_RACES = ("already exists", "UNIQUE constraint", "duplicate key value")


class StorageError(FmnistError, RuntimeError):
    """The Optuna storage or study cannot be used; the message names it (password hidden)."""


class WorkerError(FmnistError, RuntimeError):
    """A `--jobs` worker process ended with an error (its runs say which)."""


def heartbeat_interval() -> int:
    """Seconds between a running trial's heartbeats: $FMNIST_HEARTBEAT_S, else HEARTBEAT_S."""
    text = os.environ.get("FMNIST_HEARTBEAT_S", str(HEARTBEAT_S))
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 3600:
        raise StorageError(f"FMNIST_HEARTBEAT_S={text[:40]!r}: give whole seconds between 1 and 3600 "
                           f"(default {HEARTBEAT_S})")
    return value


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage from a URL: sqlite:///, postgresql://, mysql://, or journal:PATH (a log file).

    Database storages get heartbeats and lost-worker recovery; a journal file has no heartbeats (Optuna's
    JournalStorage does not support them), so a lost worker's trial stays RUNNING there.
    """
    if url.startswith("journal:"):
        path = Path(url[len("journal:") :])
        if not path.parent.is_dir():
            raise StorageError(f"Optuna storage {url}: folder {path.parent} does not exist")
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    scheme = url.split(":", 1)[0]
    if "://" not in url or scheme.split("+")[0] not in ("sqlite", "postgresql", "mysql"):
        raise StorageError(
            f"Optuna storage {redact(url)!r} is not a storage URL; use sqlite:///FILE, "
            "postgresql://USER@HOST:PORT/DB or journal:FILE"
        )
    # A bounded wait: an unreachable database fails in seconds; sqlite waits for a busy writer instead.
    connect_args = {"timeout": 60} if scheme.startswith("sqlite") else {"connect_timeout": 10}
    interval = heartbeat_interval()
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(
                url, engine_kwargs={"connect_args": connect_args}, heartbeat_interval=interval,
                grace_period=GRACE_FACTOR * interval, heartbeat_stale_trial_callback=lost_worker_callback)
        except Exception as exc:  # SQLAlchemy and driver errors come in many types
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if any(race in reason for race in SCHEMA_RACES) and attempt < 4:
                time.sleep(0.5 + attempt)  # another worker is creating the schema of a new storage right now
                continue
            raise StorageError(f"cannot open Optuna storage {redact(url)}: {reason}") from None
    raise AssertionError("unreachable")


def open_study(url: str, name: str, direction: str, sampler, pruner=None) -> optuna.Study:
    storage = open_storage(url)
    try:
        return optuna.create_study(storage=storage, study_name=name, direction=direction, sampler=sampler,
                                   pruner=pruner, load_if_exists=True)
    except ValueError as exc:  # e.g. an existing study with the other direction
        raise StorageError(f"study {name!r} in {redact(url)}: {exc}") from None


def study_key(url: str, name: str) -> str:
    """Tags a parent with the study it belongs to, without putting the storage URL in MLflow."""
    return f"{name}@{hashlib.sha256(url.encode()).hexdigest()[:8]}"


def lost_worker_callback(study: optuna.Study, trial) -> None:
    """Optuna failed a stale trial: end its MLflow run KILLED with the reason, then retry its params once."""
    run_id = trial.user_attrs.get(ATTR_RUN)
    if run_id:
        tracking.end_run_as(run_id, "KILLED", LOST_REASON, {TAG_STATE: "FAIL"})
    optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)(study, trial)


def retried(trial) -> Optional[int]:
    """The number of the trial this one redoes after its worker was lost, or None."""
    return optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)


def ensure_parent(study: optuna.Study, key: str, *, name: str, kind: str, params: dict, tags: dict,
                  experiment_id: str) -> str:
    """The study's parent run, created the first time (inside `mlflow run`: the run it made).

    Workers that start together may each create one; all then elect the oldest and the others delete
    theirs, so every worker settles on the same parent. Inside `mlflow run` on an existing study, the run
    `mlflow run` made becomes a launcher pointing at the parent.
    """
    parent = study.user_attrs.get(ATTR_PARENT)
    if parent:
        check_parent(study, parent, experiment_id)
        if tracking.inside_mlflow_run():
            tracking.create_run(name, kind=KIND_LAUNCHER, tags={TAG_STUDY: key, TAG_PARENT: parent},
                                params={"study": study.study_name})
        return parent
    tags = {TAG_STUDY: key, **tags}
    mine = tracking.create_run(name, kind=kind, tags=tags, params=params, experiment_id=experiment_id)
    rivals = tracking.find_runs([experiment_id], {TAG_STUDY: key, TAG_KIND: kind})
    winner = min(rivals, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id if rivals else mine
    if winner != mine:
        tracking.delete_run(mine)
    study.set_user_attr(ATTR_PARENT, winner)
    return winner


def check_parent(study: optuna.Study, parent: str, experiment_id: str) -> None:
    """The study's parent must be in this tracking store and experiment: workers pointed at another store
    (or a kept optuna.db beside a new mlflow.db) would otherwise log children under a run nobody sees."""
    found = tracking.find_run(parent)
    where = f"study {study.study_name!r} logs under MLflow run {parent}"
    if found is None or found.info.lifecycle_stage == "deleted":
        raise StorageError(f"{where}, which the tracking store {redact(tracking.tracking_uri())} does not have "
                           "(a new tracking store beside an old optuna.db?); give another --study or --storage, or "
                           "delete the study")
    if found.info.experiment_id != experiment_id:
        raise StorageError(f"{where} in experiment {found.info.experiment_id}, not this one ({experiment_id}); "
                           "give another --study or --experiment")


def reap_orphans(study: optuna.Study, parent_id: str) -> int:
    """End KILLED the trial runs under the parent that are RUNNING although their trial has ended: their
    process is gone. A run names its trial (tag TAG_TRIAL) from its first moment; runs of trials still
    RUNNING are left to the heartbeats."""
    optuna.storages.fail_stale_trials(study)
    running = {str(t.number) for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    reaped = 0
    for child in tracking.child_runs(parent_id):
        kind = child.data.tags.get(TAG_KIND)
        if child.info.status == "RUNNING" and kind in (KIND_SWEEP_CHILD, KIND_TRIAL) and \
                child.data.tags.get(TAG_TRIAL) not in running:
            tracking.end_run_as(child.info.run_id, "KILLED", ORPHAN_REASON)
            reaped += 1
    return reaped


def work(study: optuna.Study, objective: Callable, *, more: Callable[[optuna.Study, int], bool],
         catch: tuple = (), callbacks: tuple = (), deadline: Optional[float] = None, on_wait: Optional[Callable[[int], None]] = None) -> int:
    """Run trials in this process while `more(study, ran_so_far)`, then stay while other workers' trials
    run: fail the lost ones (no heartbeat) and run their retries. Returns the trials this process ran.

    `deadline` (time.monotonic()) stops starting trials, and waiting, after it.
    """
    ran = 0
    while deadline is None or time.monotonic() < deadline:
        if more(study, ran) or retry_waiting(study):  # (Optuna fails stale trials as each trial starts)
            study.optimize(objective, n_trials=1, catch=catch, callbacks=list(callbacks))
            ran += 1
            continue
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not running or not is_heartbeat_enabled(study._storage):
            break  # without heartbeats (a journal file) a lost trial cannot be told from a slow one
        if on_wait is not None:
            on_wait(len(running))
        wait_while_running(study, heartbeat_interval())
        optuna.storages.fail_stale_trials(study)  # a lost worker's trial: failed here, its retry queued
    return ran


WAIT_POLL_S = 1.0  # how often a waiting worker looks whether the other workers' trials have ended


def wait_while_running(study: optuna.Study, seconds: float) -> None:
    """Sleep up to `seconds`, returning as soon as no trial of the study is RUNNING: the last trial of a
    sweep usually ends well before a heartbeat interval, and the waiting worker (and its command) should
    not sit out the rest of it."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(min(WAIT_POLL_S, max(0.0, deadline - time.monotonic())))
        if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            return


def retried_count(study: optuna.Study) -> int:
    """How many trials of the study redo the work of a lost worker."""
    return sum(retried(t) is not None for t in study.get_trials(deepcopy=False))


def retry_waiting(study: optuna.Study) -> bool:
    return any(retried(t) is not None for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


def run_workers(target: Callable, arg_lists: list, threads: int = 0) -> None:
    """Run `target(*args)` in one spawned process per entry of `arg_lists` (`--jobs N`); a worker that
    fails is an error once all have ended (its trials' runs say why)."""
    codes = parallel.run_workers(target, arg_lists, tracking.tracking_uri(), threads)
    if any(codes):
        raise WorkerError(f"worker exit codes {codes}; see the runs for reasons")
