"""Confirm before crowning: re-run a study's best trials on fresh seeds and name the champion by the mean.

A search compares configs on one seed, so its best trial is partly the luckiest one (the winner's
curse). `confirm` takes the K best completed trials and trains them again on the fresh `seeds`, seed by
seed (runs of kind "confirm", nested under the study's parent run, tagged with the trial number), and
ranks the K configs by their seed mean with `aggregate` (95% intervals, the pooled-noise t-test
against the best, as in the grid's summary). Racing, as in the main job and with the same code
(`stats.race_verdict`): before a contender's next seed, its finished seeds of the earlier rounds are compared
with the leader's; a contender the test calls worse gets no more seeds (the space file's `seed_sd` stands
for the seed spread until two seeds of a contender measure it), so the champion is always one that got
every seed. Resumable: a (config, seed) that already FINISHED under the parent is not run again, and the
verdicts, made from earlier rounds only, come out the same.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

import optuna
from optuna.trial import TrialState

from ..results.seeds import (MARK_MEANING, ConfigRow, aggregate, best, configs_csv, finished_values, fmt_estimate,
                             ranked, row)
from ..results.stats import race_verdict
from ..schema import (KIND_CONFIRM, KIND_SEARCH, TAG_CHAMPION, TAG_CHAMPION_GROUP, TAG_CHAMPION_TRIAL,
                      TAG_CONFIG_HASH, TAG_CONFIRM_SEEDS, TAG_KIND, TAG_STUDY, TAG_TRIAL)
from ..tracking import records
from ..tracking.fit import tracked_fit
from ..tracking.queries import child_runs
from ..tracking.queries import history as run_history
from ..tracking.runs import run as open_run
from ..training import train
from ..training.data import Dataset
from .engine import SharedStudy
from .search import SearchSettings
from .space import Space, brief_params


@dataclass(frozen=True)
class Confirmation:
    configs: list  # ConfigRow per shortlisted trial, in shortlist order
    champion: Optional[ConfigRow]
    trial_of: dict  # config group -> the optuna FrozenTrial it came from
    markdown: str
    raced: dict  # config group -> why it got no more seeds


def shortlist(study: optuna.Study, k: int) -> list:
    """The `k` best completed trials, best first."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    return sorted(done, key=lambda t: t.value, reverse=study.direction == optuna.study.StudyDirection.MAXIMIZE)[:k]


def trial_config(space: Space, trial, settings, seed: int):
    """The trial's RunConfig, trained with `seed` instead of the study's."""
    config = space.suggest(optuna.trial.FixedTrial(trial.params), epochs=settings.epochs, subset=settings.subset,
                           device=settings.device, precision=settings.precision)
    return dataclasses.replace(config, seed=seed)


def prior_sd(space: Space, settings) -> Optional[float]:
    """The space file's seed spread, only at the size it was measured at (full data, the search's default
    epochs): a subset or a shorter run spreads more."""
    at_size = settings.subset == 0 and settings.epochs == SearchSettings.epochs
    return space.seed_sd if at_size else None


def confirm(shared: SharedStudy, data: Dataset, *, k: int, seeds: tuple, race: bool = True,
            on_start: Optional[Callable] = None, on_raced: Optional[Callable] = None,
            on_end: Optional[Callable] = None) -> Confirmation:
    """Run the shortlist of a search's study on `seeds` under its parent, seed by seed, racing the
    contenders unless `race` is False, and rank it by the seed mean of the study's metric. `on_start`
    (n, total, trial, config) before a run, `on_end` (trial, config, its summary row) after it."""
    study, parent_id, space, settings = shared.study, shared.parent_id, shared.plan.space, shared.plan.settings
    trials = shortlist(study, k)
    plan = [(t, trial_config(space, t, settings, seed)) for seed in seeds for t in trials]
    trial_of = {c.group: t for t, c in plan}
    names = {group: f"trial {t.number}" for group, t in trial_of.items()}
    finished = {c.data.tags.get(TAG_CONFIG_HASH): c for c in child_runs(parent_id)
                if c.info.status == "FINISHED" and c.data.tags.get(TAG_KIND) == KIND_CONFIRM}
    rows, raced, earlier = [], {}, ({}, {})
    with open_run(study.study_name, kind=KIND_SEARCH, run_id=parent_id):
        for n, (trial, config) in enumerate(plan):
            if n % len(trials) == 0:  # a new round: verdicts from the finished seeds of the earlier ones only
                earlier = finished_values(rows, space.metric)
            if config.group in raced:
                continue
            why = race_verdict(earlier[0], earlier[1], config.group, space.metric, prior_sd(space, settings),
                               names) if race else ""
            if why:
                raced[config.group] = why
                if on_raced is not None:
                    on_raced(trial, config, why)
                continue
            child = finished.get(config.digest())
            if child is None:
                if on_start is not None:
                    on_start(n, len(plan), trial, config)
                try:
                    result = tracked_fit(config, data, kind=KIND_CONFIRM, parent_run_id=parent_id,
                                         tags={TAG_TRIAL: trial.number, TAG_STUDY: shared.tag})
                    status, history, run_id = "FINISHED", result.history, result.run_id
                except train.DivergedError:
                    status, history, run_id = "FAILED", [], ""
            else:
                status, history, run_id = "FINISHED", run_history(child.info.run_id), child.info.run_id
            rows.append(row(config, status, history, run_id))
            if child is None and on_end is not None:
                on_end(trial, config, rows[-1])
        configs = aggregate(rows, space.metric, raced)
        champion = best(configs)
        markdown = confirm_markdown(configs, trial_of, seeds, space.metric)
        tags, metrics = {}, {}
        if champion is not None:
            est = getattr(champion, space.metric)
            tags = {TAG_CHAMPION: champion.best_run_id, TAG_CHAMPION_TRIAL: trial_of[champion.group].number,
                    TAG_CHAMPION_GROUP: champion.group, TAG_CONFIRM_SEEDS: ",".join(map(str, seeds))}
            metrics = {f"champion_{space.metric}_mean": est.mean}
            if est.ci95:
                metrics.update({f"champion_{space.metric}_std": est.std, f"champion_{space.metric}_ci95_low": est.ci95[0],
                                f"champion_{space.metric}_ci95_high": est.ci95[1]})
        records.log_report(texts={"confirm.md": markdown, "confirm.csv": configs_csv(configs, space.metric)},
                           tags=tags, metrics=metrics)
    return Confirmation(configs, champion, trial_of, markdown, raced)


def confirm_markdown(configs: list, trial_of: dict, seeds: tuple, metric: str) -> str:
    lines = [f"The best {len(configs)} trial(s), re-run on seeds {', '.join(map(str, seeds))} seed by seed (a contender "
             f"shown worse than the leader gets no more seeds: raced out), ranked by the mean {metric}; ± standard "
             f"deviation over seeds, [..] 95% interval of the mean; 'vs best': " + MARK_MEANING + ".",
             "", "| rank | trial | params | seeds | val_accuracy | 95% CI | val_nll | 95% CI | vs best |",
             "|---|---|---|---|---|---|---|---|---|"]
    for rank, c in enumerate(ranked(configs, metric), 1):
        acc, acc_ci = fmt_estimate(c.val_accuracy, percent=True)
        nll, nll_ci = fmt_estimate(c.val_nll, percent=False)
        vs = "**champion**" if c.is_best else "-" if c.p_vs_best is None else \
            f"{'=' if c.same_as_best else '<'} (p {c.p_vs_best:.3f})"
        trial = trial_of[c.group]
        lines.append(f"| {rank} | {trial.number} | {brief_params(trial.params)} | {len(c.seeds)} | {acc} | {acc_ci} | {nll} | "
                     f"{nll_ci} | {vs} |")
    out = [c for c in ranked(configs, metric) if c.raced_out]
    if out:
        lines += ["", "Raced out (no more seeds):"]
        lines += [f"- trial {trial_of[c.group].number}: {c.raced_out.split('; ')[0]}" for c in out]
        lines += ["", f"(the seed spread behind the first verdict: {out[0].raced_out.split('; ', 1)[1]})"] if "; " in out[0].raced_out else []
    return "\n".join(lines) + "\n"
