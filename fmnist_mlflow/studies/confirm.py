"""Confirm before crowning: re-run a search's best trials and its baselines on fresh seeds, as a study of
their own, and name the champion by the seed mean.

A search compares configs on one seed, so its best trial is partly the luckiest one (the winner's curse).
The contenders are the K best completed trials and the search's baselines (the space file's start points
and, when the search warm-started from a grid, the grid's best config), so the answer also says whether the
search beat them. Each (contender, seed) is a point of a confirm study (`points.Points`, as the grid's
sweep): any number of `fmnist search --confirm` workers on any machines that share the storage and the
tracking server take the points from its queue, each once; a lost worker's point is retried. The runs (kind
"confirm") nest under the search's parent run, tagged with the trial they confirm. Racing, as in the main
job and with the same code: a contender shown worse than the leader on the earlier seeds gets no more (the
space file's `seed_sd` stands for the seed spread until two seeds measure it), so the champion is one that
got every seed. The ranking is `seeds.aggregate`, the main job's comparison (95% intervals, the pooled-noise
t-test against the best); `fmnist register` registers its champion with these statistics.

The confirm study is `<search study>-confirm-<digest of K, the seeds and the size>-<generation>`. The
process that creates it fixes its contenders (the study's user attribute `contenders`), and every worker
that joins runs those, whatever it saw of the search: workers that start their confirm a little apart share
one. A command joins the newest generation while its points are not all done, or when it holds the
contenders this command would pick (a resume: only what is left runs); once a generation is done and the
search has moved on (other contenders), the next command starts the next generation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import ClassVar, Optional

import optuna
from optuna.trial import TrialState

from ..results.seeds import aggregate, best, configs_csv, ranked
from ..schema import (ATTR_ANSWER, ATTR_CHAMPION, ATTR_CONTENDERS, ATTR_SEARCH_STUDY, ATTR_PARENT, ATTR_START_POINT, ATTR_WARM_START, KIND_CONFIRM, KIND_SEARCH,
                      TAG_CHAMPION, TAG_CHAMPION_GROUP, TAG_CHAMPION_TRIAL, TAG_CONFIRM_SEEDS, TAG_CONFIRM_STUDY,
                      TAG_CONFIRMS)
from ..tracking import records
from ..tracking.links import ui_page
from ..training import train
from ..training.data import Dataset
from .engine import Hooks, SharedStudy
from .points import PointPlan, Points
from .search import Search, SearchSettings
from .confirm_report import confirm_markdown, description
from .space import Space
from .storage import open_storage


@dataclass(frozen=True)
class Contender:
    name: str  # its name in the confirm study: "trial N"
    trial: int  # the search trial whose config it is
    params: dict  # that trial's params
    roles: tuple  # ("top 1",), ("start point 0",), ("grid best",) ... what made it a contender

    @property
    def baseline(self) -> bool:
        return any(not r.startswith("top") for r in self.roles)

    @property
    def title(self) -> str:
        return f"{self.name} ({', '.join(self.roles)})"

    def attr(self) -> dict:
        return {"name": self.name, "trial": self.trial, "params": self.params, "roles": list(self.roles)}

    @classmethod
    def of(cls, attr: dict) -> "Contender":
        return cls(attr["name"], attr["trial"], dict(attr["params"]), tuple(attr["roles"]))


@dataclass(frozen=True)
class Confirmation:
    configs: list  # ConfigRow per contender
    champion: Optional[object]  # the ConfigRow of the champion, None when no contender finished a seed
    contender_of: dict  # config group -> Contender
    markdown: str
    raced: dict  # config group -> why it got no more seeds
    baselines: list  # (Contender, its ConfigRow) of the baselines that are not the champion

    def champion_contender(self) -> Optional[Contender]:
        return self.contender_of[self.champion.group] if self.champion else None


def shortlist(study: optuna.Study, k: int) -> list:
    """The `k` best completed trials, best first."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    return sorted(done, key=lambda t: t.value, reverse=study.direction == optuna.study.StudyDirection.MAXIMIZE)[:k]


def baselines(study: optuna.Study) -> list:
    """(trial, role) of the search's baselines: the grid's best config and the start points it queued first
    (the first trial of each, a completed one where a lost worker's trial was retried)."""
    found: dict = {}
    for t in study.get_trials(deepcopy=False):
        if not t.params:
            continue  # still queued: the search never ran it
        if ATTR_WARM_START in t.user_attrs:
            role = "grid best"
        elif ATTR_START_POINT in t.user_attrs:
            role = f"start point {t.user_attrs[ATTR_START_POINT]}"
        else:
            continue
        if role not in found or (found[role].state != TrialState.COMPLETE and t.state == TrialState.COMPLETE):
            found[role] = t
    return [(t, role) for role, t in found.items()]


def trial_config(space: Space, params: dict, settings, seed: int):
    """The RunConfig of a trial's params, trained with `seed` instead of the study's."""
    config = space.suggest(optuna.trial.FixedTrial(params), epochs=settings.epochs, subset=settings.subset,
                           device=settings.device, precision=settings.precision)
    return dataclasses.replace(config, seed=seed)


def contenders(study: optuna.Study, space: Space, settings, k: int) -> list:
    """The K best completed trials (best first), then the baselines; one contender per config (a baseline
    among the best keeps both roles)."""
    picked: dict = {}  # config group -> Contender
    ranked_trials = [(t, f"top {i}") for i, t in enumerate(shortlist(study, k), 1)]
    for trial, role in ranked_trials + baselines(study):
        group = trial_config(space, trial.params, settings, 0).group
        if group in picked:
            picked[group] = dataclasses.replace(picked[group], roles=picked[group].roles + (role,))
        else:
            picked[group] = Contender(f"trial {trial.number}", trial.number, dict(trial.params), (role,))
    return list(picked.values())


def prior_sd(space: Space, settings) -> Optional[float]:
    """The space file's seed spread, only at the size it was measured at (full data, the search's default
    epochs): a subset or a shorter run spreads more."""
    at_size = settings.subset == 0 and settings.epochs == SearchSettings.epochs
    return space.seed_sd if at_size else None


@dataclass(frozen=True)
class Confirm(PointPlan):
    """The confirm's plan (a Plan of the engine): its points are (contender, seed); its runs nest under the
    search's parent run, which holds its answer."""

    search: Search
    search_study: str
    parent_id: str  # the search's parent run
    k: int
    contenders: tuple  # Contender, in the order above (once the study is open: the ones it holds)
    seeds: tuple
    race: bool = True
    search_line: str = ""  # what the search ran (trials, states, why it stopped): the description says it
    generation: int = 1
    kind: ClassVar[str] = KIND_SEARCH
    catch: ClassVar[tuple] = (train.DivergedError,)

    @property
    def name(self) -> str:
        return self.search.name

    @property
    def direction(self) -> str:
        return self.search.direction

    @property
    def metric(self) -> str:
        return self.search.metric

    @property
    def device(self) -> str:
        return self.search.device

    def digest(self) -> str:
        """What workers must agree on (not the device: a CPU and a GPU machine may share a confirm)."""
        settings = {k: v for k, v in dataclasses.asdict(self.search.settings).items() if k != "device"}
        what = {"k": self.k, "seeds": list(self.seeds), "settings": settings, "space": self.search.space.digest()}
        return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]

    @property
    def base_name(self) -> str:
        return f"{self.search_study}-confirm-{self.digest()[:8]}"

    @property
    def study_name(self) -> str:
        return f"{self.base_name}-{self.generation}"

    def contenders_attr(self) -> list:
        return [c.attr() for c in self.contenders]

    @property
    def holds(self) -> str:
        return f"confirm of {self.search_study} {self.digest()}"

    @property
    def rules(self) -> dict:
        return {"race": "true" if self.race else "false"}

    @property
    def points(self) -> Points:
        space, settings = self.search.space, self.search.settings
        pairs = [(c.name, trial_config(space, c.params, settings, seed)) for seed in self.seeds for c in self.contenders]
        return Points(tuple(n for n, _ in pairs), tuple(c for _, c in pairs), self.metric, self.race,
                      prior_sd(space, settings), tuple((c.name, c.name) for c in self.contenders))

    def parent_params(self) -> dict:
        return {}  # the parent is the search's

    def parent_tags(self) -> dict:
        return {}

    def fill(self, study: optuna.Study, experiment_id: str) -> int:
        study.set_user_attr(ATTR_ANSWER, f"the contenders ranked by their seed mean of {self.metric}: confirm.md and the "
                            f"description of the MLflow parent run (user attribute {ATTR_PARENT}); Optuna's best "
                            "trial is one lucky (contender, seed), not the answer")
        study.set_user_attr(ATTR_SEARCH_STUDY, self.search_study)
        study.set_user_attr(ATTR_CONTENDERS, self.contenders_attr())
        return self.points.fill(study)

    def objective(self, shared: SharedStudy, data: Dataset, hooks: Hooks):
        tags = {c.name: {TAG_CONFIRMS: c.trial, TAG_CONFIRM_STUDY: shared.study_name} for c in self.contenders}
        return self.points.objective(shared, data, hooks, kind=KIND_CONFIRM, tags=tags)

    def report(self, shared: SharedStudy) -> Confirmation:
        """Rank the contenders on the finished points; the answer goes on the search's parent (tags, metrics,
        confirm.md/.csv, its description). Every worker that closes the study computes the same answer from
        the study's points; once the study is done, the first to close writes it and the others find it."""
        points = self.points
        raced_points, raced = points.raced(shared.study)
        rows, _ = points.rows(shared.parent_id, KIND_CONFIRM, {TAG_CONFIRM_STUDY: shared.study_name}, raced_points)
        configs = aggregate(rows, self.metric, raced)
        by_name = {c.name: c for c in self.contenders}
        contender_of = {config.group: by_name[name] for name, config in zip(points.names, points.configs)}
        champion = best(configs)
        others = [(contender_of[c.group], c) for c in ranked(configs, self.metric)
                  if contender_of[c.group].baseline and c is not champion]
        done = Confirmation(configs, champion, contender_of,
                            confirm_markdown(configs, contender_of, self.seeds, self.metric), raced, others)
        finished = not shared.study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING))
        from ..tracking.queries import get_run

        written = get_run(shared.parent_id).data.tags.get(TAG_CONFIRM_STUDY) == shared.study_name
        if finished and written:
            return done  # another worker closed the same finished study first: the same answer is there
        tags, metrics = {}, {}
        if finished and champion is not None:  # an unfinished confirm shows its table, and crowns nobody
            est = getattr(champion, self.metric)
            tags = {TAG_CHAMPION: champion.best_run_id, TAG_CHAMPION_TRIAL: contender_of[champion.group].trial,
                    TAG_CHAMPION_GROUP: champion.group, TAG_CONFIRM_SEEDS: ",".join(map(str, self.seeds)),
                    "mlflow.note.content": description(done, self.seeds, self.metric, self.search_line,
                                                       ui_page(champion.best_run_id).lstrip("/"))}
            metrics = {f"champion_{self.metric}_mean": est.mean}
            if est.ci95:
                metrics.update({f"champion_{self.metric}_std": est.std, f"champion_{self.metric}_ci95_low": est.ci95[0],
                                f"champion_{self.metric}_ci95_high": est.ci95[1]})
        if finished:
            tags[TAG_CONFIRM_STUDY] = shared.study_name  # last: the answer is complete
        records.log_report(texts={"confirm.md": done.markdown, "confirm.csv": configs_csv(configs, self.metric)},
                           tags=tags, metrics=metrics)
        if finished and champion is not None:
            # the search study says it too (Optuna's dashboard shows its user attributes): its best trial is
            # one seed's winner, the champion is this
            storage, _ = open_storage(shared.storage_url)
            search = optuna.load_study(study_name=self.search_study, storage=storage)
            search.set_user_attr(ATTR_CHAMPION, {
                "trial": contender_of[champion.group].trial, "config_group": champion.group, "run_id": champion.best_run_id,
                f"{self.metric}_mean": getattr(champion, self.metric).mean, "seeds": list(champion.seeds),
                "confirm_study": shared.study_name})
        return done


def plan(shared: SharedStudy, *, k: int, seeds: tuple, race: bool = True, search_line: str = "") -> Confirm:
    """The confirm of a search's study as it stands: its K best completed trials and its baselines."""
    search = shared.plan
    chosen = contenders(shared.study, search.space, search.settings, k)
    return Confirm(search, shared.study_name, shared.parent_id, k, tuple(chosen), tuple(seeds), race, search_line)


def open_confirm(confirm: Confirm, storage_url: str, experiment_id: str) -> SharedStudy:
    """Create or join the confirm study (see the module's docstring for which generation); its plan holds the
    contenders the study was created with."""
    storage, _ = open_storage(storage_url)
    names = set(optuna.get_all_study_names(storage))
    generation = 1
    while f"{confirm.base_name}-{generation}" in names:
        held = optuna.load_study(study_name=f"{confirm.base_name}-{generation}", storage=storage)
        if held.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING)) or \
                held.user_attrs.get(ATTR_CONTENDERS) in (None, confirm.contenders_attr()):
            break  # in progress (join it), or this same confirm (resume it), or not filled yet (wait for it)
        generation += 1
    confirm = dataclasses.replace(confirm, generation=generation)
    shared = SharedStudy.open(confirm, storage_url, confirm.study_name, experiment_id)
    held = tuple(Contender.of(a) for a in shared.study.user_attrs[ATTR_CONTENDERS])
    if held != confirm.contenders:  # created by another worker, which saw the search otherwise
        shared = dataclasses.replace(shared, plan=dataclasses.replace(confirm, contenders=held))
    return shared


def run_confirm(confirm: Confirm, data: Dataset, *, storage_url: str, experiment_id: str, jobs: int = 1, threads: int = 0,
                data_dir: Optional[str] = None, hooks: Hooks = Hooks(), ray: bool = False) -> Confirmation:
    """Open the confirm study (creating it and queueing its points the first time), run the points still
    waiting (in this process, in `jobs` worker processes, or as tasks on the Ray cluster this process joined),
    and rank the contenders on the search's parent."""
    shared = open_confirm(confirm, storage_url, experiment_id)
    left = len(shared.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
    shared.run(data, jobs=min(jobs, left) if left > 1 or ray else 1, threads=threads, data_dir=data_dir, hooks=hooks,
               ray=ray)
    return shared.close()
