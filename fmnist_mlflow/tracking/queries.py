"""Reading runs back from MLflow: one run by id, runs by tags, a parent's children, a run's epoch curves.

Sweeps, searches, confirm and the registry find their runs by the tags of `schema`; every such query is
here, so that a filter string is written once.
"""

from __future__ import annotations

from typing import Optional

import mlflow
from mlflow.tracking import MlflowClient

from .connection import TrackingError

# Per-epoch metrics as `training.train.fit` reports them (EpochMetrics), logged with step = epoch.
EPOCH_METRICS = ("train_loss", "val_loss", "val_nll", "val_accuracy", "epoch_seconds")


def client() -> MlflowClient:
    return MlflowClient()


def find_runs(experiment_ids: list, tags: dict, status: Optional[str] = None) -> list:
    """Runs carrying all `tags` (and `status`, if given), newest first."""
    filters = [f"tags.`{k}` = '{v}'" for k, v in tags.items()]
    if status:
        filters.append(f"attributes.status = '{status}'")
    return mlflow.search_runs(
        experiment_ids, filter_string=" and ".join(filters), order_by=["attributes.start_time DESC"],
        output_format="list",
    )


def child_runs(parent_run_id: str) -> list:
    parent = client().get_run(parent_run_id)
    return find_runs([parent.info.experiment_id], {"mlflow.parentRunId": parent_run_id})


def history(run_id: str) -> list:
    """The per-epoch metrics of a run, as `fit` reported them (a list of EpochMetrics dicts)."""
    by_step: dict = {}
    for key in EPOCH_METRICS:
        for metric in client().get_metric_history(run_id, key):
            by_step.setdefault(metric.step, {"epoch": metric.step})[key] = metric.value
    return [by_step[step] for step in sorted(by_step)]


def get_run(run_id: str):
    """A run by id, or TrackingError in one line (unknown id, deleted run)."""
    try:
        return client().get_run(run_id)
    except mlflow.exceptions.MlflowException as exc:
        raise TrackingError(f"run {run_id!r}: {str(exc).splitlines()[0] if str(exc) else 'not found'}") from None


def find_run(run_id: str):
    """A run by id, or None if this tracking store has no such run (a store that fails still raises)."""
    try:
        return client().get_run(run_id)
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


# What an MLproject parameter (or an extra `-P key=...`) holds when the command is to resolve it: `mlflow
# run` logs the parameters as given, before the command runs, and MLflow params never change.
DEFERRED_VALUES = ("grid", "auto")
RESOLVED_SUFFIX = "_resolved"  # `seeds=grid` as `mlflow run` logged it; `seeds_resolved=0,1,2` as used


def run_params(run) -> dict:
    """A run's params as used: `<key>_resolved` (see `records.log_params_once`) in place of `<key>`."""
    params = dict(run.data.params)
    for key in [k for k in params if k.endswith(RESOLVED_SUFFIX)]:
        params[key[: -len(RESOLVED_SUFFIX)]] = params.pop(key)
    return params
