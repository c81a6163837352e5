"""The Optuna extension as a plan of the engine (`engine.SharedStudy`): search model3's training settings
beyond the grid (the space file says which: by default the optimizer and its learning rate, dropout,
weight decay, schedule and its warm-up, batch size, label smoothing, augmentation, model3's width and the
weight average), each trial a nested MLflow run under the study's parent.

The study's first trials come from Optuna's queue (the grid's best config and the space file's start
points, queued when the study is created), the rest from the sampler. Running the search again on the same
storage and study resumes it; several workers (processes or machines) sharing the storage and tracking
server fill one parent; a lost worker's trial is retried. Each epoch reports the validation metric to
Optuna. A pruned trial's run ends KILLED with the tag `fmnist.trial_state = PRUNED` (and no model): never
FINISHED, so it cannot pass for a finished success. A diverging trial's run ends FAILED (Optuna state
FAIL). Completed trials end FINISHED (COMPLETE).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import optuna

from ..schema import (ATTR_RUN, ATTR_START_POINT, ATTR_WARM_START, KIND_SEARCH, KIND_SWEEP, KIND_TRIAL, TAG_BEST_RUN,
                      TAG_KIND, TAG_STATE, TAG_STUDY, TAG_SWEEP, TAG_TRIAL)
from ..tracking import records
from ..tracking.fit import tracked_fit
from ..tracking.queries import client, find_runs, run_params
from ..tracking.runs import set_run_tags
from ..training import train
from ..training.data import Dataset
from . import pruners, search_report, stopping
from .engine import Hooks, SharedStudy
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


@dataclass(frozen=True)
class Search:
    """The search's plan: what a trial is, and what the study's parent reports."""

    study_name: str
    space: Space
    settings: SearchSettings
    sampler_name: str = "tpe"
    pruner_name: str = pruners.PRUNERS[0]  # the default, halve1
    seed: Optional[int] = None  # the sampler's (see sampler_seed)
    patience: int = stopping.DEFAULT_PATIENCE  # stop after this many trials without a gain over the seed noise; 0: never
    kind: ClassVar[str] = KIND_SEARCH
    parent_id: ClassVar[Optional[str]] = None  # the study's creator creates the parent
    catch: ClassVar[tuple] = (train.DivergedError,)  # a diverging trial fails alone

    @property
    def name(self) -> str:
        return self.study_name

    @property
    def direction(self) -> str:
        return self.space.direction

    @property
    def metric(self) -> str:
        return self.space.metric

    @property
    def device(self) -> str:
        return self.settings.device

    @property
    def holds(self) -> str:
        return f"space {self.space.name} {self.space.digest()}, {self.settings.epochs} epochs, subset {self.settings.subset}"

    @property
    def rules(self) -> dict:
        return {"pruner": self.pruner_name, "sampler": self.sampler_name}

    def parent_params(self) -> dict:
        return {"study": self.study_name, "space_name": self.space.name, "metric": self.space.metric,
                "direction": self.space.direction, "epochs": self.settings.epochs, "subset": self.settings.subset}

    def parent_tags(self) -> dict:
        return records.environment_tags(self.settings.device)

    def sampler(self, worker: int, finished_before: int) -> optuna.samplers.BaseSampler:
        return make_sampler(self.sampler_name, sampler_seed(self.seed, finished_before, worker))

    def pruner(self) -> optuna.pruners.BasePruner:
        return pruners.make(self.pruner_name, self.settings.epochs)

    def fill(self, study: optuna.Study, experiment_id: str) -> Optional[tuple]:
        """Queue the grid's best config (when the experiment holds a finished sweep) and the space file's
        start points (known-good recipes: they give TPE good points to model from before its random
        start-up trials run out). Returns (the grid's best as params, notes on the values the space could
        not hold as the grid had them), or None."""
        sweeps = [r for r in find_runs([experiment_id], {TAG_KIND: KIND_SWEEP}, status="FINISHED")
                  if TAG_BEST_RUN in r.data.tags and TAG_SWEEP in r.data.tags]
        warm = None
        if sweeps:
            best = run_params(client().get_run(sweeps[0].data.tags[TAG_BEST_RUN]))
            params = self.space.params_for(best)
            if params:
                study.enqueue_trial(params, user_attrs={ATTR_WARM_START: sweeps[0].data.tags[TAG_BEST_RUN]})
                warm = params, self.space.clamped(best)
        for i, params in enumerate(self.space.start_points):
            study.enqueue_trial(params, user_attrs={ATTR_START_POINT: i}, skip_if_exists=True)
        return warm

    def more(self, study: optuna.Study) -> bool:
        """Until the study stopped itself (any worker's callback), or the command's budget or --timeout says stop."""
        return not (self.patience and stopping.stopped_because(study))

    def callbacks(self) -> list:
        # a space without a measured seed_sd: any improvement counts as a gain
        return [stopping.Stagnation(self.space.seed_sd or 0.0, self.patience)] if self.patience else []

    def objective(self, shared: SharedStudy, data: Dataset, hooks: Hooks):
        space, settings = self.space, self.settings

        def objective(trial: optuna.Trial) -> float:
            config = space.suggest(trial, epochs=settings.epochs, subset=settings.subset, device=settings.device,
                                   precision=settings.precision)
            on_epoch, on_batch = hooks.progress(trial, config) if hooks.progress else (None, None)

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
                result = tracked_fit(
                    config, data, kind=KIND_TRIAL, parent_run_id=shared.parent_id,
                    tags={TAG_TRIAL: trial.number, TAG_STUDY: shared.tag}, on_epoch_end=on_epoch_end,
                    on_batch=on_batch, killed_on=(optuna.TrialPruned,), on_start=on_start)
            except optuna.TrialPruned:
                set_run_tags(run_id[0], {TAG_STATE: "PRUNED"})
                raise
            except BaseException:
                if run_id:
                    set_run_tags(run_id[0], {TAG_STATE: "FAIL"})
                raise
            set_run_tags(result.run_id, {TAG_STATE: "COMPLETE"})
            return result.final[space.metric]

        return objective

    def report(self, shared: SharedStudy) -> search_report.SearchSummary:
        """The study's summary, logged on its parent: trials, curves, figures, the best trial, what pruning
        saved and what each candidate pruner would have stopped."""
        epochs = self.settings.epochs
        summary = search_report.summarize(shared.study, shared.parent_id, epochs, pruners.replay_all(shared.study, epochs),
                                          retried=shared.retried(), stopped=stopping.stopped_because(shared.study))
        search_report.log(shared.study, summary, self.space.metric, epochs)
        return summary
