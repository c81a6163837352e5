"""A run's lifecycle in MLflow: opened (or resumed, or adopted from `mlflow run`), and always ended in a
terminal state: FINISHED, FAILED (with a `fmnist.failure_reason` tag) or KILLED (Ctrl-C, SIGTERM, or a
pruned trial); none is left RUNNING. Runs another process left open are ended here too: by the pid that
opened them (`end_abandoned`), or by whoever knows their process is gone (`end_run_as`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
from typing import Iterator, Optional

import mlflow
import psutil

from ..schema import (KIND_CONFIRM, KIND_EVALUATION, KIND_SWEEP_CHILD, KIND_TRAIN, KIND_TRIAL, TAG_FAILURE, TAG_KIND,
                      TAG_WORKER)
from .queries import client, find_runs

log = logging.getLogger(__name__)

TRAINING_KINDS = (KIND_TRAIN, KIND_SWEEP_CHILD, KIND_TRIAL, KIND_CONFIRM)  # runs that train: system metrics
# Runs one process opens and closes by itself; a sweep's children and a search's trials are the engine's
# to reap (by their trial's state), and parents are held open by several workers in turn.
SOLO_KINDS = (KIND_TRAIN, KIND_EVALUATION)  # (a confirm's runs are the engine's too)
ABANDONED_REASON = ("abandoned: its process on this machine ended without closing it (e.g. the tracking store's disk "
                    "was full, or it was killed); ended by the next fmnist command")
ENDED_RUNS = "fmnist_ended_runs"  # attribute of an interrupt: the runs it ended KILLED, innermost first


def store_errors() -> tuple:
    """What talking to the tracking store can raise: MLflow's errors, HTTP and database errors, a full disk."""
    import requests
    import sqlalchemy.exc

    return mlflow.exceptions.MlflowException, requests.RequestException, sqlalchemy.exc.SQLAlchemyError, OSError


def ended_by(interrupt: BaseException) -> list:
    """The runs an interrupt ended KILLED on its way out (for the command's last line)."""
    return list(getattr(interrupt, ENDED_RUNS, []))


def _end(status: str, reason: Optional[str] = None) -> None:
    """End the active run; when called for an error the tracking store may be the error, so a store error
    here is logged and the run is still forgotten by this process.

    `mlflow.end_run` takes the run off this process's stack of active runs before it tells the server, so
    even when the server is gone the run is forgotten here (tests/test_faults.py checks that MLflow still
    does so); a later resume reaps it on the server (`SharedStudy.reap_orphans`)."""
    try:
        if reason:
            mlflow.set_tag(TAG_FAILURE, reason[:5000])
        mlflow.end_run(status)
    except store_errors() as exc:
        # the command's own error line says the store failed and that such runs are ended by the next command
        log.info("could not end run %s as %s: %s", mlflow.active_run() and mlflow.active_run().info.run_id,
                    status, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        if mlflow.active_run():
            with contextlib.suppress(*store_errors()):
                mlflow.end_run(status)


@contextlib.contextmanager
def run(
    run_name: str,
    *,
    kind: str,
    parent_run_id: Optional[str] = None,
    run_id: Optional[str] = None,
    tags: Optional[dict] = None,
    killed_on: tuple = (),
    experiment_id: Optional[str] = None,
) -> Iterator[mlflow.ActiveRun]:
    """Open a run (or resume `run_id`, or adopt `mlflow run`'s) and always end it in a terminal state.

    Ends FINISHED on success; KILLED on KeyboardInterrupt (the CLI turns SIGTERM into one) or on an
    exception in `killed_on` (e.g. a pruned trial), tagging the reason; FAILED with the reason otherwise.
    The exception is re-raised; an interrupt carries the ids of the runs it ended (`ended_by`).
    """
    # With no run_id, MLflow adopts $MLFLOW_RUN_ID (and unsets it, so that nested runs are new runs).
    adopt = run_id is None and parent_run_id is None and bool(os.environ.get("MLFLOW_RUN_ID"))
    tags = {TAG_KIND: kind, **({} if run_id else {TAG_WORKER: worker_name()}),
            **{k: str(v) for k, v in (tags or {}).items()}}  # the REST API takes strings only
    active = mlflow.start_run(
        run_id=run_id,
        # a child goes where its parent is, whatever experiment this process has selected
        experiment_id=(client().get_run(parent_run_id).info.experiment_id if parent_run_id
                       else None if run_id or adopt else experiment_id),
        run_name=None if (run_id or adopt) else run_name,
        parent_run_id=parent_run_id,
        nested=parent_run_id is not None,
        tags=tags,
        log_system_metrics=kind in TRAINING_KINDS and system_metrics(),
    )
    if adopt:
        mlflow.set_tags({"mlflow.runName": run_name, **tags})
    try:
        yield active
    except KeyboardInterrupt as exc:
        _end("KILLED", f"interrupted ({exc or 'Ctrl-C'})")
        setattr(exc, ENDED_RUNS, [*ended_by(exc), active.info.run_id])
        raise
    except killed_on as exc:
        _end("KILLED", f"{type(exc).__name__}: {exc}")
        raise
    except BaseException as exc:
        _end("FAILED", f"{type(exc).__name__}: {exc}")
        raise
    else:
        if run_id and TAG_FAILURE in client().get_run(run_id).data.tags:
            mlflow.delete_tag(TAG_FAILURE)  # a resumed run that now finishes: the old reason no longer holds
        mlflow.end_run("FINISHED")


def create_run(run_name: str, *, kind: str, tags: dict, params: dict, experiment_id: Optional[str] = None) -> str:
    """A run opened and ended at once (FINISHED): a parent that later commands resume and fill."""
    from .records import log_params_once

    with run(run_name, kind=kind, tags=tags, experiment_id=experiment_id) as active:
        log_params_once(params)
    return active.info.run_id


def worker_name() -> str:
    return f"{platform.node()}:{os.getpid()}"


def system_metrics() -> bool:
    """Whether training runs log MLflow's system metrics (CPU, memory, disk and network every 10 s; GPU
    too where nvidia-ml-py is installed): yes, unless $MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING says false
    (`--no-system-metrics` sets it for a command and its workers)."""
    from mlflow.environment_variables import MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING as switch

    return switch.get() if switch.is_set() else True


def end_abandoned(experiment_id: str) -> int:
    """End FAILED the experiment's RUNNING runs of SOLO_KINDS whose process, on this machine, is gone (their
    end state could not be written, e.g. on a full disk); returns how many. Runs of other machines are left
    alone: a process there cannot be seen from here."""
    here = platform.node()
    ended = 0
    for r in find_runs([experiment_id], {}, status="RUNNING"):
        host, _, pid = r.data.tags.get(TAG_WORKER, "").rpartition(":")
        if r.data.tags.get(TAG_KIND) in SOLO_KINDS and host == here and pid.isdigit() and not psutil.pid_exists(int(pid)):
            end_run_as(r.info.run_id, "FAILED", ABANDONED_REASON)
            ended += 1
    return ended


def end_run_as(run_id: str, status: str, reason: str, tags: Optional[dict] = None) -> None:
    """End a run another process left open (its process is gone), with the reason."""
    set_run_tags(run_id, {TAG_FAILURE: reason, **(tags or {})})
    if client().get_run(run_id).info.status == "RUNNING":
        client().set_terminated(run_id, status)


def set_run_tags(run_id: str, tags: dict) -> None:
    """Tag any run, open or ended (e.g. a trial's final Optuna state)."""
    for key, value in tags.items():
        client().set_tag(run_id, key, str(value))
