"""Commands run by `mlflow run`: the run MLflow made before the command started ($MLFLOW_RUN_ID).

Where the work belongs in that run (its experiment is not Default), the first run the command opens adopts
it (`runs.run`). Where it does not (`mlflow run .` without --experiment-name puts it in Default, where
`fmnist register` never looks; `register`, whose evaluation runs nest under training runs; a worker that
joins a study whose parent exists), the command takes it out of the process's environment, so that MLflow
does not adopt it, and a `Launcher` tags it with the run that holds the work once that is known.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import mlflow

from ..schema import KIND_LAUNCHER, TAG_KIND, TAG_PARENT
from .experiment import DEFAULT_EXPERIMENT_ID, use_experiment
from .links import run_link
from .queries import client


def inside_mlflow_run() -> bool:
    """True until the run `mlflow run` created has been adopted (MLflow unsets $MLFLOW_RUN_ID then)."""
    return bool(os.environ.get("MLFLOW_RUN_ID"))


@dataclass
class Launcher:
    """The run `mlflow run` made that holds no work (None when there is none): `point_at` tags it, once,
    with the run that does."""

    run_id: Optional[str] = None

    def point_at(self, work_run_id: str) -> None:
        if self.run_id is None:
            return
        launcher, self.run_id = self.run_id, None
        target = client().get_run(work_run_id)
        experiment = mlflow.get_experiment(target.info.experiment_id).name
        in_default = client().get_run(launcher).info.experiment_id == DEFAULT_EXPERIMENT_ID
        client().set_tag(launcher, TAG_PARENT, work_run_id)
        client().set_tag(launcher, "mlflow.note.content",
                         f"`mlflow run` made this run{' in Default' if in_default else ''}; the work is run "
                         f"{work_run_id} ({target.info.run_name}) in experiment {experiment!r}: {run_link(work_run_id)}."
                         + (f" `mlflow run . --experiment-name {experiment}` leaves no run here." if in_default else ""))


def release(note: str = "") -> Launcher:
    """Take the run `mlflow run` made out of this process's environment (MLflow would adopt it as the first
    run the process opens) and mark it a launcher."""
    made = os.environ.pop("MLFLOW_RUN_ID", None)
    if made:
        client().set_tag(made, TAG_KIND, KIND_LAUNCHER)
        if note:
            client().set_tag(made, "mlflow.note.content", note)
    return Launcher(made)


def enter(name: str) -> tuple[str, Launcher]:
    """The experiment this command logs to (its id) and the launcher to point at the work. Inside `mlflow
    run`, the experiment of the run MLflow made, unless that is Default while the command's experiment is
    another: then MLflow's run is released as a launcher and the work goes to `name`."""
    made_in = os.environ.get("MLFLOW_EXPERIMENT_ID") if inside_mlflow_run() else None
    if made_in and (made_in != DEFAULT_EXPERIMENT_ID or name == "Default"):
        return use_experiment(name, made_in), Launcher()
    launcher = Launcher()
    if made_in:
        os.environ.pop("MLFLOW_EXPERIMENT_ID")
        launcher = release(f"`mlflow run` put this run in Default; the work was logged to experiment {name!r}. "
                           f"`mlflow run . --experiment-name {name}` leaves no run here.")
    return use_experiment(name), launcher
