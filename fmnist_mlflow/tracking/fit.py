"""One configuration trained as one tracked MLflow run: the glue between the training core and MLflow.

The CLI's `train`, every child of a sweep and every trial of a search go through `tracked_fit`, so they
log the same params, metrics, figure and model, and end in the same terminal states.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..results import figures
from ..schema import KIND_TRAIN
from ..training import train
from ..training.config import RunConfig
from ..training.data import Dataset
from . import logged_models, records
from .runs import run


@dataclass(frozen=True)
class TrackedResult:
    run_id: str
    history: list[train.EpochMetrics]
    model_uri: str  # models:/m-... of the logged model
    model: torch.nn.Module  # trained, in eval mode

    @property
    def final(self) -> train.EpochMetrics:
        return self.history[-1]


def tracked_fit(
    config: RunConfig,
    data: Dataset,
    *,
    kind: str = KIND_TRAIN,
    parent_run_id: Optional[str] = None,
    tags: Optional[dict] = None,
    on_epoch_end: Optional[train.EpochCallback] = None,
    on_batch: Optional[train.BatchCallback] = None,
    killed_on: tuple = (),
    on_start: Optional[Callable[[str], None]] = None,
) -> TrackedResult:
    """Train `config` on `data` inside a run; log config, per-epoch metrics, loss curves and the model.

    `on_epoch_end` runs after each epoch's metrics are logged (a pruner raises from it); the run ends
    FAILED if training diverges, KILLED on interrupt or on an exception in `killed_on`. `on_start` gets
    the run id as soon as the run exists.
    """
    history: list = []

    def epoch_end(metrics: train.EpochMetrics) -> None:
        history.append(metrics)
        records.log_epoch(metrics)
        if on_epoch_end is not None:
            on_epoch_end(metrics)

    with run(
        config.seed_name, kind=kind, parent_run_id=parent_run_id, tags=tags, killed_on=killed_on
    ) as active:
        if on_start is not None:
            on_start(active.info.run_id)
        datasets = records.log_config(config, data)
        try:
            result = train.fit(config, data, on_epoch_end=epoch_end, on_batch=on_batch)
        finally:
            if history:  # the curves so far help explain a failed or stopped run too
                records.log_report(figures={"loss_curves.png": figures.run_curves(history, config.seed_name)})
        final = history[-1]
        model_uri = logged_models.log_model(
            result.model, {"config": config.to_params()}, name=config.seed_name, params=config.to_params(),
            metrics={k: final[k] for k in ("val_accuracy", "val_nll", "val_loss")}, step=final["epoch"],
            dataset=datasets["validation"])
    return TrackedResult(run_id=active.info.run_id, history=history, model_uri=model_uri, model=result.model)
