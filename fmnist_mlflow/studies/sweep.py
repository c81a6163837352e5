"""The fixed grid as a plan of the engine (`engine.SharedStudy`): one Optuna trial per (config, seed),
queued in grid order as waiting trials when the study is created, logged as nested MLflow runs: one parent
per sweep, one child per point.

Each grid point is a (config, seed): the trial's params `config` (the config's run name) and `seed`. The
study (by default `<grid>-<digest>-<experiment stamp>` in sqlite:///optuna.db) is the grid's queue: every
`fmnist sweep` on the same storage, study and tracking server takes the next waiting point from it, so N
workers on N machines share one grid and each point is claimed by one worker. The queue runs seed by seed
(a partial sweep still compares every config on the same seeds), slow model3 first (parallel workers end
together). Running the sweep again resumes it: COMPLETE points are done, an interrupted point was queued
again by its worker as it stopped, a lost worker's point is retried by the others (see `engine`). A config
that diverges fails alone (its trial FAIL, its run FAILED; not queued again: it would diverge again). When
no point is left, the parent gets the summary table (CSV, Markdown), the loss curves per loss function,
the accuracy chart, and the best config by the selection metric (as tags and metrics: a resumed sweep may
change its best, and MLflow params cannot change).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import optuna
from optuna.trial import TrialState

from ..results import figures, report, seeds
from ..schema import (ATTR_ANSWER, ATTR_PARENT, KIND_SWEEP, KIND_SWEEP_CHILD, TAG_BEST_GROUP, TAG_BEST_RUN,
                      TAG_FAILED_CONFIGS, TAG_RACE, TAG_RETRIED, TAG_SELECT, TAG_SWEEP)
from ..tracking import records
from ..tracking.experiment import experiment_stamp
from ..tracking.links import ui_page
from ..training import train
from ..training.config import direction
from ..training.data import Dataset
from ..urls import DEFAULT_STORAGE
from .engine import Hooks, SharedStudy
from .grid import Grid, sweep_digest
from .points import PointPlan, Points


@dataclass
class SweepResult:
    parent_run_id: str
    rows: list  # summary rows, one per (config, seed), in grid order
    configs: list  # seeds.ConfigRow per config, aggregated over seeds
    best: Optional[seeds.ConfigRow]  # best config by the seed mean of the selection metric
    skipped: int = 0  # (config, seed) runs already FINISHED before this command started
    raced: dict = field(default_factory=dict)  # config group -> why it got no more seeds
    failed: list = field(default_factory=list)  # rows of runs that did not finish
    markdown: str = ""
    histories: dict = field(default_factory=dict)  # (model, loss, optimizer) -> {seed: per-epoch metrics}
    retried: int = 0  # points redone because the worker running them was lost
    study_name: str = ""


def default_study_name(grid: Grid, configs: list, experiment_id: str) -> str:
    """`<grid>-<digest of its configs>-<stamp of the experiment>`: the same grid logged to another
    experiment, or to a new tracking store beside an old optuna.db, is another sweep with its own parent;
    workers on one tracking server agree on all three."""
    return f"{grid.name}-{sweep_digest(configs)[:8]}-{experiment_stamp(experiment_id)}"


@dataclass(frozen=True)
class Sweep(PointPlan):
    """The grid's plan: what a point's trial is, and what the sweep's parent reports."""

    grid: Grid
    configs: tuple  # RunConfig per (config, seed)
    select: str  # the validation metric that picks the best config
    race: bool = True  # configs shown worse than the leader get no more seeds (see `stats.race_verdict`)
    kind: ClassVar[str] = KIND_SWEEP
    parent_id: ClassVar[Optional[str]] = None  # the study's creator creates the parent
    catch: ClassVar[tuple] = (train.DivergedError,)  # a diverging config fails alone

    @property
    def name(self) -> str:
        return self.grid.name

    @property
    def direction(self) -> str:
        return direction(self.select)

    @property
    def metric(self) -> str:
        return self.select

    @property
    def device(self) -> str:
        return self.configs[0].device

    @property
    def holds(self) -> str:
        return f"grid {self.grid.name} {sweep_digest(list(self.configs))}"

    @property
    def rules(self) -> dict:
        return {"race": "true" if self.race else "false"}

    def parent_params(self) -> dict:
        first = self.configs[0]
        return {
            "grid_name": self.grid.name, "grid_file": os.path.basename(self.grid.source), "configs": len(self.configs),
            "epochs": first.epochs, "batch_size": first.batch_size,
            "seeds": ",".join(str(s) for s in sorted({c.seed for c in self.configs})), "subset": first.subset,
            "device": first.device,
        }  # fmt: skip

    def parent_tags(self) -> dict:
        return {TAG_SWEEP: sweep_digest(list(self.configs)), TAG_RACE: "on" if self.race else "off",
                **records.environment_tags(self.configs[0].device)}

    @property
    def points(self) -> Points:
        first = self.configs[0]
        # seed_sd is the spread of val_accuracy at the grid's own size: a subset or fewer epochs spread more
        at_size = self.select == "val_accuracy" and first.subset == 0 and first.epochs == self.grid.epochs
        return Points(tuple(c.run_name for c in self.configs), self.configs, self.select, self.race,
                      self.grid.seed_sd if at_size else None)

    def fill(self, study: optuna.Study, experiment_id: str) -> int:
        """Queue every point of the new study, in grid order; returns how many."""
        # what a reader of the study (Optuna's dashboard) should know: its "best trial" is one lucky seed
        study.set_user_attr(ATTR_ANSWER, f"the configs ranked by their seed mean of {self.select}, with intervals and "
                            "'=' marks: the description and summary.md of the MLflow parent run (user attribute "
                            f"{ATTR_PARENT}); Optuna's best trial is the best single (config, seed), not the answer")
        return self.points.fill(study)

    def objective(self, shared: SharedStudy, data: Dataset, hooks: Hooks):
        return self.points.objective(shared, data, hooks, kind=KIND_SWEEP_CHILD)

    def report(self, shared: SharedStudy) -> SweepResult:
        raced_points, raced = self.points.raced(shared.study)
        result = summarize(shared.parent_id, self.points, raced_points, raced)
        result.skipped, result.study_name, result.retried = shared.completed_before, shared.study_name, shared.retried()
        if result.retried:
            result.markdown += (f"\n\n{result.retried} (config, seed) run(s) were retried after the worker running "
                                "them was lost (their first runs ended KILLED, `fmnist.failure_reason` \"worker lost\").\n")
        log_summary(result, self.select)
        return result


def run_sweep(grid: Grid, configs: list, data: Dataset, *, experiment_id: str, storage_url: str = DEFAULT_STORAGE,
              study_name: Optional[str] = None, select: str = "val_accuracy", jobs: int = 1,
              data_dir: Optional[str] = None, threads: int = 0, race: bool = True,
              hooks: Hooks = Hooks(), ray: bool = False) -> SweepResult:
    """Open the sweep's study (creating it and its parent the first time), run the points still waiting
    (in this process, or in up to `jobs` worker processes that each load the data from `data_dir`), and
    summarize them on the parent. Other `fmnist sweep` commands on the same storage and study share the
    points. `race`: a config shown worse than the leader gets no more seeds. `ray`: the workers are tasks on
    the Ray cluster this process joined (`jobs` 0: one per slot)."""
    plan = Sweep(grid, tuple(configs), select, race)
    shared = SharedStudy.open(plan, storage_url, study_name or default_study_name(grid, configs, experiment_id),
                              experiment_id)
    left = len(shared.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
    shared.run(data, jobs=min(jobs, left) if left > 1 or ray else 1, threads=threads, data_dir=data_dir, hooks=hooks,
               ray=ray)
    return shared.close()


def summarize(parent_id: str, points: Points, raced_points: Optional[dict] = None,
              raced: Optional[dict] = None) -> SweepResult:
    """One row per (config, seed) from its newest child (a FINISHED one if any), in grid order; a point in
    `raced_points` ((run name, seed) -> reason) is RACED OUT; `raced`: config group -> reason."""
    rows, histories = points.rows(parent_id, KIND_SWEEP_CHILD, raced_points=raced_points)
    select = points.select
    aggregated = seeds.aggregate(rows, select, raced)
    return SweepResult(parent_run_id=parent_id, rows=rows, configs=aggregated, best=seeds.best(aggregated),
                       skipped=0, failed=[r for r in rows if r["status"] not in ("FINISHED", seeds.RACED_OUT)],
                       markdown=report.to_markdown(rows, select, raced), histories=histories, raced=dict(raced or {}))


def log_summary(result: SweepResult, select: str) -> None:
    """The sweep's answer on the active (parent) run: tables, figures, the best config's tags and metrics."""
    texts = {"summary.csv": seeds.to_csv(result.rows), "summary_by_config.csv": seeds.configs_csv(result.configs, select),
             "summary.md": result.markdown}
    done = [c for c in result.configs if c.val_accuracy is not None]
    plots = {**({"loss_curves.png": figures.sweep_curves(result.histories)} if result.histories else {}),
             **({"val_accuracy.png": figures.accuracy_bars(done)} if done else {})}
    failed = [f"{r['model']}-{r['loss']}-{r['optimizer']}" + (f" seed {r['seed']}" if len(result.rows) > len(result.configs) else "")
              for r in result.failed]
    tags = {TAG_FAILED_CONFIGS: ", ".join(failed) or "none", TAG_SELECT: select, TAG_RETRIED: str(result.retried),
            # the run's description: the answer on its Overview, before any artifact is opened
            "mlflow.note.content": report.description(
                result.configs, select, ui_page(result.best.best_run_id).lstrip("/") if result.best else "")}
    metrics = {}
    if result.best:
        b = result.best
        tied = [c.name for c in seeds.ranked(result.configs, select) if c.same_as_best and not c.is_best]
        tags.update({TAG_BEST_RUN: b.best_run_id, "best_model": b.model, "best_loss": b.loss,
                     "best_optimizer": b.optimizer, "best_lr": str(b.lr), TAG_BEST_GROUP: b.group,
                     "best_n_seeds": str(len(b.seeds)), "best_indistinguishable": ", ".join(tied) or "none"})
        metrics = {"best_val_accuracy": b.val_accuracy.mean, "best_val_nll": b.val_nll.mean}
        if b.val_accuracy.std is not None:
            metrics.update({"best_val_accuracy_std": b.val_accuracy.std, "best_val_accuracy_ci95_low": b.val_accuracy.ci95[0],
                            "best_val_accuracy_ci95_high": b.val_accuracy.ci95[1]})
    records.log_report(texts=texts, figures=plots, tags=tags, metrics=metrics)
