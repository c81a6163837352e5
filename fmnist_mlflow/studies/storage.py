"""The Optuna storage a study lives in, as every worker opens it: a database (sqlite, PostgreSQL, MySQL)
with heartbeats and lost-worker recovery, or a journal file without them; and what a worker checks of a
study another made (ready, its rules, its parent run in this tracking store).

Every running trial beats every `heartbeat_interval()` seconds (Optuna's `RDBStorage(heartbeat_interval,
grace_period, heartbeat_stale_trial_callback)`); a trial silent for GRACE_FACTOR beats (its worker killed with
SIGKILL, out of memory, its machine gone) is failed by another worker through `lost_worker_callback`: its
MLflow run ended KILLED with the reason, and its params queued once more (Optuna's
`RetryHeartbeatStaleTrialCallback`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from typing import Optional

import optuna

from ..errors import FmnistError
from ..retry import on_race
from ..schema import ATTR_PARENT, ATTR_RULES, ATTR_RUN, TAG_STATE
from ..tracking.connection import tracking_uri
from ..tracking.queries import find_run
from ..tracking.runs import end_run_as
from ..urls import redact, scrub, storage_problem

log = logging.getLogger(__name__)
READY_TIMEOUT_S = 120  # how long a worker waits for the creator of a new study to name its parent run
WAIT_POLL_S = 1.0  # how often a waiting worker looks whether the study is ready
HEARTBEAT_S = 30
GRACE_FACTOR = 3  # beats a trial may miss before it counts as lost (a busy database can delay one)
LOST_REASON = "worker lost: no heartbeat from the process running this trial (killed, or its machine gone)"


class StorageError(FmnistError, RuntimeError):
    """The Optuna storage or study cannot be used; the message names it (password hidden)."""


def quiet_optuna() -> None:
    """For the processes that use Optuna, at their boundary (the study commands, each worker): Optuna logs
    each failed trial as a warning with its traceback, which the run's failure reason and the CLI's one-line
    error already say; its heartbeats and retry callback are marked experimental."""
    import warnings

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


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


def open_storage(url: str) -> tuple[optuna.storages.BaseStorage, bool]:
    """An Optuna storage from a URL (sqlite:///, postgresql://, mysql://, or journal:PATH, a log file),
    and whether its trials have heartbeats (a journal file has none: Optuna's JournalStorage does not
    support them, so a lost worker's trial stays RUNNING there)."""
    problem = storage_problem(url)  # the CLI checked it already; a library caller gets the same message
    if problem:
        raise StorageError(f"Optuna storage {problem}")
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(url[len("journal:"):])), False
    sqlite = url.startswith("sqlite")
    # A bounded wait: an unreachable database fails in seconds; sqlite waits for a busy writer instead.
    connect_args = {"timeout": 60} if sqlite else {"connect_timeout": 10}
    interval = heartbeat_interval()

    def create() -> optuna.storages.RDBStorage:
        return optuna.storages.RDBStorage(
            url, engine_kwargs={"connect_args": connect_args}, heartbeat_interval=interval,
            grace_period=GRACE_FACTOR * interval, heartbeat_stale_trial_callback=lost_worker_callback)

    try:
        # another worker may be creating the schema of a new storage right now
        storage = on_race(create, attempts=5, wait_s=1.0)
    except Exception as exc:  # SQLAlchemy and driver errors come in many types
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StorageError(f"cannot open Optuna storage {redact(url)}: {scrub(reason, url)}") from None
    if sqlite:
        serialize_sqlite(storage.engine)
    return storage, True


def serialize_sqlite(engine) -> None:
    """Make every transaction on a sqlite storage take the write lock when it begins (BEGIN IMMEDIATE,
    SQLAlchemy's documented pysqlite recipe). `RDBStorage.engine` is the one private-looking piece we lean
    on: Optuna offers no hook for the transaction mode, and without it sqlite hands a waiting trial to two
    workers.

    A waiting trial is claimed through `RDBStorage.set_trial_state_values`, which reads the trial with
    SELECT ... FOR UPDATE and sets it RUNNING only if it is still WAITING. On PostgreSQL and MySQL that row
    lock lets one worker win. SQLite has no FOR UPDATE, and pysqlite runs the SELECT before it begins the
    write transaction, so two workers could both read WAITING and both run the trial (seen: 4 processes
    popping 300 queued trials claimed 4 of them twice). With the write lock taken first, the second reader
    waits and then sees RUNNING."""
    import sqlalchemy

    @sqlalchemy.event.listens_for(engine, "connect")
    def _no_driver_transactions(dbapi_connection, record) -> None:
        dbapi_connection.isolation_level = None  # pysqlite's own BEGIN would come too late

    @sqlalchemy.event.listens_for(engine, "begin")
    def _begin_immediate(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened while the storage checked its schema predate the hooks


def study_tag(url: str, name: str) -> str:
    """The study a parent and its trials belong to (tag TAG_STUDY), without the storage URL in MLflow."""
    return f"{name}@{hashlib.sha256(url.encode()).hexdigest()[:8]}"


def lost_worker_callback(study: optuna.Study, trial) -> None:
    """Optuna failed a stale trial: end its MLflow run KILLED with the reason, then retry its params once."""
    run_id = trial.user_attrs.get(ATTR_RUN)
    if run_id:
        end_run_as(run_id, "KILLED", LOST_REASON, {TAG_STATE: "FAIL"})
    optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)(study, trial)


def retried(trial) -> Optional[int]:
    """The number of the trial this one redoes after its worker was lost, or None."""
    return optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)


def wait_until_ready(study: optuna.Study, where: str) -> str:
    """The parent run of a study another worker has just created, once that worker has named it."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        parent = study.user_attrs.get(ATTR_PARENT)  # read from the storage on every call
        if parent:
            return parent
        if time.monotonic() > deadline:
            raise StorageError(f"{where} names no parent run {READY_TIMEOUT_S} s after it was created: the worker "
                               "that created it did not finish setting it up; delete the study or give another --study")
        time.sleep(WAIT_POLL_S)


def check_rules(study: optuna.Study, rules: dict, where: str) -> None:
    """A study resumed or joined must be judged by the rules it was started with (a pruner, a sampler,
    racing): a study half pruned by one rule and half by another answers neither. A study from before the
    rules were recorded takes this command's."""
    held = study.user_attrs.get(ATTR_RULES)
    if held is None:
        study.set_user_attr(ATTR_RULES, rules)
        return
    differ = [k for k in sorted(set(held) | set(rules)) if held.get(k) != rules.get(k)]
    if differ:
        was = ", ".join(f"--{k} {held.get(k)}" for k in differ)
        now = ", ".join(f"--{k} {rules.get(k)}" for k in differ)
        raise StorageError(f"{where} runs with {was}; this command asks {now}: every worker and every resume of a "
                           f"study uses its rules (give {was}, or another --study)")


def check_parent(study: optuna.Study, parent: str, experiment_id: str) -> None:
    """The study's parent must be in this tracking store and experiment: workers pointed at another store
    (or a kept optuna.db beside a new mlflow.db) would otherwise log children under a run nobody sees."""
    found = find_run(parent)
    where = f"study {study.study_name!r} logs under MLflow run {parent}"
    if found is None or found.info.lifecycle_stage == "deleted":
        raise StorageError(f"{where}, which the tracking store {redact(tracking_uri())} does not have "
                           "(a new tracking store beside an old optuna.db?); give another --study or --storage, or "
                           "delete the study")
    if found.info.experiment_id != experiment_id:
        raise StorageError(f"{where} in experiment {found.info.experiment_id}, not this one ({experiment_id}); "
                           "give another --study or --experiment")


def delete_half_made(study_name: str, storage) -> None:
    """Delete a study whose start failed; when the storage itself is what failed, say so and leave it (the
    error being raised names the cause)."""
    try:
        optuna.delete_study(study_name=study_name, storage=storage)
    except (KeyError, optuna.exceptions.StorageInternalError, OSError) as exc:
        log.warning("could not delete the half-made study %r (%s): delete it, or give another --study",
                    study_name, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
