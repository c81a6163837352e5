"""Choose the best config among comparable finished runs, evaluate it on the test set, register it, move the alias.

Selection: only runs that are comparable (trained on the same number of images for the same number of
epochs: the largest training set found, then the most epochs), only finite validation metrics (a NaN
run never wins), grouped by config (tag `fmnist.config_group`, shared by the seeds of one config). When
some config has several seeds, single-seed configs are left out (one lucky seed cannot be weighed
against a mean) and the config with the best seed mean of the selection metric wins. Every seed of the
winner is evaluated on the test set (mean, std, 95% interval); the one model registered is the seed
best on validation (selection never looks at the test set), with the seed figures in its tags and
description.

Where a user finds the evaluation: in an evaluation run (kind `evaluation`, named `<run>-test`) nested
under each evaluated training run, MLflow 3's pattern: it takes the logged model and the test split as
inputs and logs `test_accuracy`, `test_loss`, `test_nll` linked to both (the Models view shows them on
the model), with the confusion matrix, per-class accuracy as a figure, a CSV and a Markdown table, and
misclassified examples as artifacts; the training run keeps its training alone (its charts are its epoch
curves). The same figures are tags on the model version. The alias (default `champion`)
moves only to a version at least as good on the selection metric (compared from the runs themselves,
seed means where there are seeds; a holder without a finite value never blocks), unless forced; every
move is appended to the registered model's tag `fmnist.alias_history.<alias>` (JSON: version, previous,
reason, time).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from typing import Optional

from mlflow.entities import Run

from ..errors import FmnistError
from ..results import figures, seeds, stats
from ..results.stats import Estimate
from ..schema import (KIND_CONFIRM, KIND_EVALUATION, KIND_SEARCH, KIND_SWEEP_CHILD, KIND_TRAIN, KIND_TRIAL,
                      TAG_ALIAS_HISTORY, TAG_CHAMPION_GROUP, TAG_CONFIG_GROUP, TAG_CONFIG_HASH, TAG_CONFIG_NAME,
                      TAG_CONFIRM_SEEDS, TAG_CONFIRM_STUDY, TAG_KIND, VERSION_CONFIG, VERSION_SEED_RUNS,
                      VERSION_SOURCE_RUN)
from ..training.config import better, pick_best
from ..training.data import Split
from . import logged_models as model_store
from . import records
from .experiment import find_experiment
from .queries import child_runs, find_run, find_runs, get_run, run_params
from .runs import run as open_run

MODEL_KINDS = (KIND_TRAIN, KIND_SWEEP_CHILD, KIND_TRIAL, KIND_CONFIRM)  # run kinds that log a model
TEST_METRICS = ("test_accuracy", "test_loss", "test_nll")


class RegistryError(FmnistError, RuntimeError):
    """Nothing to register, or the registry refused; the message says which."""


@dataclass(frozen=True)
class Registration:
    name: str
    version: str
    run_id: str
    select: str
    value: float  # the selection metric: the config's seed mean
    test: dict  # test metrics of the registered run (floats)
    test_accuracy: Estimate  # over every seed of the chosen config
    alias: str
    alias_moved: bool
    previous: Optional[str]  # the version that held the alias before, if any
    reason: str


def candidates(*, experiment: Optional[str] = None, parent_run_id: Optional[str] = None,
               run_id: Optional[str] = None) -> list:
    """Finished runs that logged a model: one run, the children of a sweep/search, or a whole experiment."""
    if run_id:
        run = get_run(run_id)
        if run.info.status != "FINISHED":
            raise RegistryError(f"run {run_id} is {run.info.status}, not FINISHED")
        return [run]
    if parent_run_id:
        get_run(parent_run_id)  # a clear error for an unknown id
        runs = [r for r in child_runs(parent_run_id) if r.info.status == "FINISHED"]
    else:
        experiment_id = find_experiment(experiment)
        if experiment_id is None:
            raise RegistryError(f"experiment {experiment!r} does not exist")
        runs = find_runs([experiment_id], {}, status="FINISHED")
    return [r for r in runs if r.data.tags.get(TAG_KIND) in MODEL_KINDS]


def _finite(run, select: str) -> bool:
    value = run.data.metrics.get(select)
    return value is not None and math.isfinite(value) and math.isfinite(run.data.metrics.get("val_nll", 0.0))


def regime(run) -> tuple:
    """(training images, epochs) of a run: runs compare only within one."""
    p = run_params(run)
    return int(p.get("train_size", 0) or 0), int(p.get("epochs", 0) or 0)


def comparable(runs: list) -> tuple:
    """(the runs trained like the most complete ones, a note on what was left out)."""
    if not runs:
        return runs, ""
    top = max(regime(r) for r in runs)
    kept = [r for r in runs if regime(r) == top]
    note = "" if len(kept) == len(runs) else (
        f"{len(runs) - len(kept)} run(s) trained on fewer images or epochs were left out "
        f"(compared: {top[0]:,} training images, {top[1]} epochs)")
    return kept, note


@dataclass(frozen=True)
class Selection:
    runs: list[Run]  # the chosen config's finished seed runs
    pick: Run  # the seed run to register: best on the selection metric
    value: Estimate  # the selection metric over the seeds
    considered: int  # configs compared
    notes: tuple  # what was left out, and why
    decided_by: str = ""  # which comparison chose the config (the version's description says it)


def group_of(run) -> str:
    tags = run.data.tags
    return tags.get(TAG_CONFIG_GROUP) or tags.get(TAG_CONFIG_HASH) or run.info.run_id


def row_of(run) -> seeds.RunRow:
    """A finished run as a row of the comparison the sweep and the confirm make (`seeds.aggregate`)."""
    p, m = run_params(run), run.data.metrics
    return seeds.RunRow(model=p.get("model", ""), loss=p.get("loss", ""), optimizer=p.get("optimizer", ""),
                        lr=float(p.get("lr", 0) or 0), seed=int(p.get("seed", 0) or 0), status="FINISHED",
                        train_loss=m.get("train_loss"), val_loss=m.get("val_loss"), val_nll=m.get("val_nll"),
                        val_accuracy=m.get("val_accuracy"), train_seconds=0.0, group=group_of(run),
                        run_id=run.info.run_id)


def choose(runs: list, select: str) -> Selection:
    """The config the main job's comparison names best among `runs` (`seeds.aggregate`: the best seed mean
    among the configs with every seed; the one the sweep and the confirm use), and its seed best on `select`."""
    notes = []
    finite = [r for r in runs if _finite(r, select)]
    if len(finite) < len(runs):
        notes.append(f"{len(runs) - len(finite)} run(s) without a finite {select} or val_nll were left out")
    if not finite:
        raise RegistryError(f"no finished run with a logged model and a finite {select} metric to choose from")
    kept, note = comparable(finite)
    if note:
        notes.append(note)
    if any(r.data.tags.get(TAG_KIND) == KIND_CONFIRM for r in kept):
        trials = [r for r in kept if r.data.tags.get(TAG_KIND) == KIND_TRIAL]
        if trials:
            notes.append(f"{len(trials)} search trial run(s) were left out: a trial's one seed is the draw that made it "
                         "a contender, which its confirm re-ran on fresh seeds")
            kept = [r for r in kept if r.data.tags.get(TAG_KIND) != KIND_TRIAL]
    groups: dict = {}
    seen = set()
    for r in sorted(kept, key=lambda r: -r.info.start_time):  # one run per (config, seed): the newest
        key = (group_of(r), run_params(r).get("seed"))
        if key not in seen:
            seen.add(key)
            groups.setdefault(key[0], []).append(r)
    if len(seen) < len(kept):
        notes.append(f"{len(kept) - len(seen)} older run(s) of a (config, seed) that ran again were left out")
    if any(len(g) > 1 for g in groups.values()):
        single = sum(len(g) == 1 for g in groups.values())
        if single:
            notes.append(f"{single} single-seed config(s) were left out: one seed cannot be weighed against a mean")
        groups = {k: g for k, g in groups.items() if len(g) > 1}
    most = max(len(g) for g in groups.values())
    # as in a raced sweep or confirm: the best is a config that got every seed (one with fewer seeds was
    # raced out, or lost a seed)
    fewer = {k: f"fewer seeds ({len(g)} of {most})" for k, g in groups.items() if len(g) < most}
    configs = seeds.aggregate([row_of(r) for g in groups.values() for r in g], select, fewer)
    winner = seeds.best(configs)
    chosen = groups[winner.group]
    pick = pick_best(chosen, select, key=lambda r: r.data.metrics[select])
    return Selection(chosen, pick, getattr(winner, select), len(groups), tuple(notes),
                     f"the best seed mean of {select} among {len(groups)} comparable config(s)")


def confirm_runs(parent: Run) -> list:
    """The FINISHED runs of the newest confirm of a search (`parent`): every contender's seed runs."""
    study = parent.data.tags.get(TAG_CONFIRM_STUDY)
    return [r for r in child_runs(parent.info.run_id) if r.info.status == "FINISHED"
            and r.data.tags.get(TAG_KIND) == KIND_CONFIRM and r.data.tags.get(TAG_CONFIRM_STUDY) == study]


def confirmed(parent: Run, select: str) -> Optional[Selection]:
    """The champion a search's confirm named (`studies.confirm`), as its seed runs, or None when `parent` holds
    no finished confirm. The statistics are the confirm's: its seeds, its ranking."""
    tags = parent.data.tags
    group, study = tags.get(TAG_CHAMPION_GROUP), tags.get(TAG_CONFIRM_STUDY)
    if not group or not study or select != run_params(parent).get("metric", "val_accuracy"):
        return None  # no finished confirm, or one that ranked on another metric: compare the runs by `select`
    runs = confirm_runs(parent)
    chosen = [r for r in runs if group_of(r) == group and _finite(r, select)]
    if not chosen:
        raise RegistryError(f"search run {parent.info.run_id} names a champion (config {group}) whose confirm runs "
                            "are gone")
    value = stats.estimate([r.data.metrics[select] for r in chosen], fraction=select == "val_accuracy")
    pick = pick_best(chosen, select, key=lambda r: r.data.metrics[select])
    seeds_ = tags.get(TAG_CONFIRM_SEEDS, "")
    return Selection(chosen, pick, value, len({group_of(r) for r in runs}), (),
                     f"the champion of the confirm of search {parent.info.run_name} (seeds {seeds_}: the best seed mean "
                     f"of {select} among {len({group_of(r) for r in runs})} contender(s), the search's best trials and "
                     "its baselines, compared by a two-sided pooled-noise t-test: confirm.md on the search's run)")


def select_runs(select: str, *, experiment: Optional[str] = None, parent_run_id: Optional[str] = None,
                run_id: Optional[str] = None) -> Selection:
    """What `fmnist register` registers: one run; a search's confirmed champion (the newest confirmed search of
    the experiment, or the one given); else the best config among the finished runs of the scope."""
    if run_id:
        return choose(candidates(run_id=run_id), select)
    if parent_run_id:
        found = confirmed(get_run(parent_run_id), select)
        return found or choose(candidates(parent_run_id=parent_run_id), select)
    experiment_id = find_experiment(experiment)
    if experiment_id is None:
        raise RegistryError(f"experiment {experiment!r} does not exist")
    runs = candidates(experiment=experiment)
    top = max((regime(r) for r in runs), default=(0, 0))
    searches = [r for r in find_runs([experiment_id], {TAG_KIND: KIND_SEARCH}) if TAG_CONFIRM_STUDY in r.data.tags]
    for search in searches:  # newest first
        found = confirmed(search, select)
        if found is not None and regime(found.pick) == top:  # a smoke search does not stand for a full-data one
            others = len(searches) - 1
            note = (f"the newest confirmed search ({search.info.run_name}) names the champion"
                    + (f"; {others} older confirmed search(es) left aside (--parent-run-id for one)" if others else "")
                    + "; other runs of the experiment are not weighed against it (its confirm weighed the baselines)")
            return dataclasses.replace(found, notes=found.notes + (note,))
    return choose(runs, select)


def evaluation_run(run) -> Optional[Run]:
    """The newest FINISHED evaluation run of a training run (nested under it), or None."""
    found = find_runs([run.info.experiment_id], {"mlflow.parentRunId": run.info.run_id,
                                                          TAG_KIND: KIND_EVALUATION}, status="FINISHED")
    return found[0] if found else None


def evaluate_once(run, test: Split, source: Optional[str] = None) -> dict:
    """Test metrics of the run's logged model, from its evaluation run; evaluated (in a new evaluation run
    nested under the training run) the first time only. `source`: where the test files were read."""
    done = evaluation_run(run)
    if done is not None and all(m in done.data.metrics for m in TEST_METRICS):
        return {m: done.data.metrics[m] for m in TEST_METRICS}
    from ..training import scoring
    from ..training.data import locate
    from .logged_models import logits

    logged = model_store.logged_model(run.info.run_id)
    model = model_store.load_pyfunc(model_store.model_uri(run.info.run_id))
    result = scoring.score(lambda x: logits(model, x), test, run_params(run).get("loss", "ce"))
    title = f"{run.info.run_name} on the test set: {100 * result['test_accuracy']:.2f}%"
    metrics = {m: result[m] for m in TEST_METRICS}
    # Per-class accuracy as one figure on a common axis and a table, not ten metrics: the UI draws each metric
    # as its own single-bar chart on its own scale.
    per_class = result["per_class_accuracy"]
    csv = "class,test_accuracy\n" + "".join(f"{k},{v:.4f}\n" for k, v in per_class.items())
    table = ("| class | test accuracy |\n|---|---|\n"
             + "".join(f"| {k} | {100 * v:.2f}% |\n" for k, v in per_class.items()))
    tags = {TAG_CONFIG_NAME: run.data.tags.get(TAG_CONFIG_NAME, run.info.run_name),
            TAG_CONFIG_GROUP: group_of(run), "mlflow.note.content":
            f"The model of run {run.info.run_name} ({run.info.run_id}) on the 10,000 test images: "
            f"{100 * result['test_accuracy']:.2f}% accuracy. The training run holds its training alone."}
    with open_run(f"{run.info.run_name}-test", kind=KIND_EVALUATION, parent_run_id=run.info.run_id, tags=tags):
        records.log_evaluation(
            logged.model_id if logged else None, test, source or str(locate(None)), metrics,
            texts={"per_class.csv": csv, "per_class.md": table},
            figures={"confusion_matrix.png": figures.confusion(result["confusion"], title),
                     "per_class_accuracy.png": figures.per_class(per_class, title),
                     "misclassified.png": figures.misclassified(test, result, title)})
    return metrics


def register(selection: Selection, test: Split, *, name: str, alias: str, select: str,
             force: bool = False, test_source: Optional[str] = None) -> Registration:
    """Evaluate every seed of the chosen config on the test set, register the picked seed, move the alias."""
    run = selection.pick
    per_seed = {r.info.run_id: evaluate_once(r, test, test_source) for r in selection.runs}
    test_metrics = per_seed[run.info.run_id]
    test_acc = stats.estimate([m["test_accuracy"] for m in per_seed.values()], fraction=True)
    value = selection.value.mean
    params = run_params(run)
    config = {k: params[k] for k in ("model", "loss", "optimizer", "lr", "dropout", "epochs", "batch_size",
                                              "weight_decay", "schedule", "warmup", "label_smoothing", "augment",
                                              "width", "ema", "tta")
              if k in params}
    seeds = sorted(int(run_params(r).get("seed", 0)) for r in selection.runs)
    tags = {VERSION_SOURCE_RUN: run.info.run_id, VERSION_CONFIG: json.dumps(config), select: f"{value:.6f}",
            TAG_CONFIG_GROUP: group_of(run), "seeds": ",".join(map(str, seeds)),
            VERSION_SEED_RUNS: ",".join(r.info.run_id for r in selection.runs),
            "test_accuracy_mean": f"{test_acc.mean:.6f}",
            **{k: f"{v:.6f}" for k, v in test_metrics.items()}}
    if test_acc.std is not None:
        tags.update({"test_accuracy_std": f"{test_acc.std:.6f}", "test_accuracy_ci95_low": f"{test_acc.ci95[0]:.6f}",
                     "test_accuracy_ci95_high": f"{test_acc.ci95[1]:.6f}"})
    description = describe(run, selection, test_acc, select)
    version = model_store.register_model_version(run.info.run_id, name, tags, description)
    current = model_store.alias_version(name, alias)
    previous = str(current.version) if current else None
    if current is None:
        moved, reason = True, "first holder"
    elif previous == version:
        moved, reason = False, "already holds the alias"
    else:
        held = held_value(current, select)
        is_better = not math.isfinite(held) or better(select, value, held)
        if is_better or force:
            moved = True
            reason = f"{select} {value:.4f} vs {held:.4f}" + ("" if is_better else " (forced)")
        else:
            moved, reason = False, f"version {current.version} is better on {select} ({held:.4f} vs {value:.4f}); use --force"
    if moved:
        model_store.move_alias(name, alias, version)
        entry = {"version": version, "previous": previous, "reason": reason, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        model_store.append_model_tag_json(name, f"{TAG_ALIAS_HISTORY}.{alias}", entry)
    return Registration(name, version, run.info.run_id, select, value, test_metrics, test_acc, alias, moved,
                        previous, reason)


def held_value(version, select: str) -> float:
    """The alias holder's `select`, read from its runs (the seed mean where it was registered with seeds);
    NaN when it has none (its runs deleted, or no such metric), so that a holder without a finite value never
    blocks the alias. A store that fails to answer raises: that is no reason to move the alias."""
    ids = version.tags.get(VERSION_SEED_RUNS) or version.tags.get(VERSION_SOURCE_RUN) or version.run_id
    values = []
    for run_id in filter(None, ids.split(",")):
        found = find_run(run_id)
        value = found.data.metrics.get(select) if found is not None else None
        if value is not None:
            values.append(value)
    return sum(values) / len(values) if values else math.nan


def describe(run, selection: Selection, test_acc: Estimate, select: str) -> str:
    config = run.data.tags.get(TAG_CONFIG_NAME, run.info.run_name)
    n = len(selection.runs)
    seed_list = ", ".join(sorted((run_params(r).get("seed", "?") for r in selection.runs), key=str))
    spread = (f" ± {100 * test_acc.std:.2f} (95% CI {100 * test_acc.ci95[0]:.2f}-{100 * test_acc.ci95[1]:.2f}%)"
              if test_acc.std is not None else "")
    return (f"{config}, seed {run_params(run).get('seed', '?')}: the best on {select} of the {n} seed run(s) (seeds "
            f"{seed_list}; {select} mean {selection.value.mean:.4f}) of {selection.decided_by or 'the chosen config'}. "
            f"Test accuracy over its {n} seed(s): {100 * test_acc.mean:.2f}%{spread}. "
            f"Input: {model_store.MODEL_INPUT}; output: 10 float32 logits in class_names order.")


def alias_history(name: str, alias: str) -> list:
    return model_store.model_tag_json(name, f"{TAG_ALIAS_HISTORY}.{alias}")
