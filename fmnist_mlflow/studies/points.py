"""Studies of fixed points: every trial is one (config, seed) taken from Optuna's queue of waiting trials,
seed by seed, raced. The grid's sweep (`sweep.Sweep`) and a search's confirm (`confirm.Confirm`) are such
studies: any number of workers (processes or machines sharing the storage and tracking server) share the
points, each claimed by one worker; a lost worker's point is retried through the heartbeats (`engine`).

A point is the trial's params `config` (the config's name in the study) and `seed`. Racing: before a point
runs, the finished points of the earlier seeds are compared (`stats.race_verdict`); a config shown worse than
the leader gets no more seeds: its point ends PRUNED with the reason, and no run. The verdict on a seed's
round depends on the earlier rounds' results only, not on how many workers ran them or in which order.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Optional

import optuna
from optuna.trial import TrialState

from ..results import seeds
from ..results.stats import race_verdict
from ..schema import (ATTR_NO_POINT, ATTR_POINT, ATTR_RACED_OUT, ATTR_REQUEUED, ATTR_RUN, TAG_CONFIG_HASH, TAG_KIND,
                      TAG_STUDY, TAG_TRIAL)
from ..tracking.fit import tracked_fit
from ..tracking.queries import child_runs
from ..tracking.queries import history as history_of
from ..training import train

log = logging.getLogger(__name__)
NO_POINT = "the queue was empty when this worker asked: other workers took the last points; nothing ran"


@dataclass(frozen=True)
class Points:
    """The points of a study: `names[i]` is the study's name of `configs[i]`'s config (the seeds of one config
    share it); `labels` a readable name per config name; `prior_sd` the seed spread racing assumes until two
    seeds of a config measure it (None: no verdict before that)."""

    names: tuple
    configs: tuple  # RunConfig per point
    select: str  # the metric a point's trial returns and racing compares
    race: bool = True
    prior_sd: Optional[float] = None
    labels: tuple = ()  # ((name, label), ...): how verdicts and lines name a config

    @property
    def label_of(self) -> dict:
        return dict(self.labels) or {n: c.label for n, c in zip(self.names, self.configs)}

    def ordered(self) -> list:
        """(name, config) seed by seed, model3 (the slowest) first within a seed (parallel workers end
        together); otherwise in the given order."""
        pairs = list(zip(self.names, self.configs))
        return sorted(pairs, key=lambda p: (p[1].seed, p[1].model != "model3"))

    def label(self, name: str, seed: int) -> str:
        return f"{self.label_of.get(name, name)} seed {seed}"

    def fill(self, study: optuna.Study) -> int:
        """Queue every point of a new study, in order; returns how many."""
        ordered = self.ordered()
        for name, config in ordered:
            study.enqueue_trial({"config": name, "seed": config.seed}, user_attrs={ATTR_POINT: self.label(name, config.seed)})
        return len(ordered)

    @staticmethod
    def more(study: optuna.Study) -> bool:
        return bool(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))

    def raced_out(self, study: optuna.Study, name: str, seed: int) -> str:
        """Why config `name` gets no more seeds ("" if it races on), from the finished points of the seeds
        before `seed`. (With several workers, a point of the previous round still running counts from the
        next round on.)"""
        if not self.race:
            return ""
        family = {n: c.model for n, c in zip(self.names, self.configs)}
        done: dict = {}
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
            other = t.params.get("config")
            if t.state == TrialState.PRUNED:
                if other == name and ATTR_RACED_OUT in t.user_attrs:
                    return t.user_attrs[ATTR_RACED_OUT]  # out for good
            elif other in family and t.params["seed"] < seed:
                done.setdefault(other, []).append(t.value)
        return race_verdict(done, family, name, self.select, self.prior_sd, self.label_of)

    def raced(self, study: optuna.Study) -> tuple:
        """({(name, seed): why} of the points not run, {config group: why} of the configs raced out)."""
        group = {n: c.group for n, c in zip(self.names, self.configs)}
        points, groups = {}, {}
        for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)):
            if ATTR_RACED_OUT in t.user_attrs and t.params.get("config") in group:
                points[(t.params["config"], t.params["seed"])] = t.user_attrs[ATTR_RACED_OUT]
                groups.setdefault(group[t.params["config"]], t.user_attrs[ATTR_RACED_OUT])
        return points, groups

    def objective(self, shared, data, hooks, *, kind: str, tags: Optional[dict] = None):
        """The study's objective: claim the trial's point, race it, train it as a run of `kind` nested under
        the study's parent (`tags`: config name -> extra tags of its runs); returns the run's metric."""
        ordered = self.ordered()
        by_point = {(n, c.seed): c for n, c in ordered}
        names, seed_values = list(dict.fromkeys(n for n, _ in ordered)), sorted({c.seed for _, c in ordered})
        todo = len(shared.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
        started, ran = time.monotonic(), [0]

        def objective(trial: optuna.Trial) -> float:
            if ATTR_POINT not in trial.user_attrs:  # not from the queue: the sampler's, as the queue ran dry
                trial.set_user_attr(ATTR_NO_POINT, NO_POINT)
                raise optuna.TrialPruned(NO_POINT)
            name, seed = trial.suggest_categorical("config", names), trial.suggest_categorical("seed", seed_values)
            config = by_point[(name, seed)]
            why = self.raced_out(shared.study, name, seed)
            if why:
                trial.set_user_attr(ATTR_RACED_OUT, why)
                if hooks.on_raced is not None:
                    hooks.on_raced(config, why, self.label(name, seed))
                raise optuna.TrialPruned(why)  # no MLflow run: nothing was trained
            if hooks.on_start is not None:
                k, elapsed = ran[0], time.monotonic() - started
                hooks.on_start(k, max(todo, k + 1), config, elapsed,
                               elapsed / k * (todo - k) if k and todo > k else None, self.label(name, seed))
            ran[0] += 1
            on_epoch_end, on_batch = hooks.progress(trial, config) if hooks.progress else (None, None)
            try:
                result = tracked_fit(
                    config, data, kind=kind, parent_run_id=shared.parent_id,
                    tags={TAG_TRIAL: trial.number, TAG_STUDY: shared.tag, **(tags or {}).get(name, {})},
                    on_epoch_end=on_epoch_end, on_batch=on_batch,
                    on_start=lambda run_id: trial.set_user_attr(ATTR_RUN, run_id))
            except train.DivergedError:
                raise  # its run ended FAILED with the reason; the plan's `catch` keeps the worker going
            except BaseException:
                # Interrupted, or the tracking server gone (which would fail every config alike: it stops the
                # worker): this worker, the trial's one owner, queues the point again for the resume.
                requeue(trial)
                raise
            return result.final[self.select]

        return objective

    def rows(self, parent_id: str, kind: str, match: Optional[dict] = None, raced_points: Optional[dict] = None) -> tuple:
        """(one summary row per point from its newest child run of `kind` (carrying the tags `match`; a
        FINISHED one if any), in the given order; {(model, loss, optimizer): {seed: per-epoch metrics}} of the
        finished ones). A point in `raced_points` ((name, seed) -> why) is RACED OUT."""
        by_hash: dict = {}
        for child in child_runs(parent_id):  # newest first
            tags = child.data.tags
            if tags.get(TAG_KIND) != kind or any(tags.get(k) != v for k, v in (match or {}).items()):
                continue
            key = tags.get(TAG_CONFIG_HASH)
            if key not in by_hash or (by_hash[key].info.status != "FINISHED" and child.info.status == "FINISHED"):
                by_hash[key] = child
        rows, histories = [], {}
        for name, config in zip(self.names, self.configs):
            child = by_hash.get(config.digest())
            if child is None:
                out = (name, config.seed) in (raced_points or {})
                rows.append(seeds.row(config, seeds.RACED_OUT if out else "NOT RUN", [], ""))
                continue
            history = history_of(child.info.run_id)
            if child.info.status == "FINISHED":
                histories.setdefault((config.model, config.loss, config.optimizer), {})[config.seed] = history
            rows.append(seeds.row(config, child.info.status, history, child.info.run_id))
        return rows, histories


class PointPlan:
    """What the plans of fixed-point studies (the sweep, the confirm) share: trials come from the queue, so the
    sampler is never asked while it holds a point, nothing prunes, and the study is done when the queue is."""

    def sampler(self, worker: int, finished_before: int) -> optuna.samplers.BaseSampler:
        return optuna.samplers.RandomSampler(seed=worker)

    def pruner(self) -> optuna.pruners.BasePruner:
        return optuna.pruners.NopPruner()

    def more(self, study: optuna.Study) -> bool:
        return Points.more(study)

    def callbacks(self) -> list:
        return []


def requeue(trial: optuna.Trial) -> None:
    """Queue a stopped trial's point again. When the storage is what failed, the point is left to the
    heartbeats (another worker fails its trial and retries it) and the command's own error names the failure."""
    try:
        trial.study.enqueue_trial(trial.params, user_attrs={ATTR_POINT: trial.user_attrs[ATTR_POINT],
                                                            ATTR_REQUEUED: trial.number})
    except (optuna.exceptions.StorageInternalError, OSError) as exc:
        # its trial stays RUNNING with no heartbeat: another worker fails it and retries the point (the
        # command's own error line says what failed: most likely this same storage)
        log.info("could not queue point %s again (%s); a worker on the study retries it once its heartbeats stop",
                 trial.user_attrs[ATTR_POINT], exc)
