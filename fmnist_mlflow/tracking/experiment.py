"""The experiment a command logs to: selected (created if needed) by name, described for the UI, and its
abandoned runs ended; its stamp names one experiment in one tracking store."""

from __future__ import annotations

import hashlib
from typing import Optional

import mlflow

from .queries import client
from .runs import end_abandoned

DEFAULT_EXPERIMENT_ID = "0"  # MLflow's "Default" experiment
# What the MLflow UI reads: the experiment's description, and its kind (MLflow 3 otherwise may open a new
# experiment in its GenAI view).
EXPERIMENT_TAGS = {
    "mlflow.note.content": "Fashion-MNIST CNNs from fmnist-mlflow: the report's grid (parent runs of kind sweep), "
                           "Optuna searches (kind search) and single runs; select on validation metrics, never "
                           "training loss. `fmnist register` evaluates the winner on the test set.",
    "mlflow.experimentKind": "custom_model_development",
}


def use_experiment(name: str, experiment_id: Optional[str] = None) -> str:
    """Select the experiment `experiment_id`, else the one named `name` (creating it), for this process's
    runs; end its abandoned runs (`runs.end_abandoned`) and describe it for the UI. Returns its id."""
    try:
        experiment = mlflow.set_experiment(experiment_id=experiment_id) if experiment_id else mlflow.set_experiment(name)
    except mlflow.exceptions.MlflowException:
        # Another worker created it at the same moment; select it. (Seen once: the run that followed still
        # landed in Default, so parents are also created with an explicit experiment id.)
        experiment = mlflow.set_experiment(name)
    end_abandoned(experiment.experiment_id)
    for key, value in EXPERIMENT_TAGS.items():
        if key not in experiment.tags:
            try:
                client().set_experiment_tag(experiment.experiment_id, key, value)
            except mlflow.exceptions.MlflowException:
                # Workers starting together race to set it (a sqlite-backed server answers the loser with a
                # UNIQUE constraint error); the tag is there either way.
                if key not in client().get_experiment(experiment.experiment_id).tags:
                    raise
    return experiment.experiment_id


def find_experiment(name: str) -> Optional[str]:
    """The id of the experiment named `name`, or None."""
    experiment = mlflow.get_experiment_by_name(name)
    return experiment.experiment_id if experiment else None


def experiment_stamp(experiment_id: str) -> str:
    """Names one experiment in one tracking store: its id and creation time, hashed. Every worker on the
    same server gets the same stamp; a new store (ids start again at 1) gets another."""
    created = client().get_experiment(experiment_id).creation_time
    return hashlib.sha256(f"{experiment_id}:{created}".encode()).hexdigest()[:6]
